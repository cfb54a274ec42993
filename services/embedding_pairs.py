"""The launcher's embedding pairs: `embedding_workers` x (embedding worker + embedding batcher).

Worker ids e0, e1, ... (sy.req.e0 ...). Each pair is one supervised unit, like a generation pair:
the batcher packs texts for its worker (batcher/embedding_batcher.py), the worker runs the encoder
(workers/embedding_service.py). `Stack` (services/launcher.py) calls this at start, supervision,
stop and when it writes stack.json; nothing here starts without embedding_workers and a model.
"""
from __future__ import annotations

from common import proc
from common.ports import free_port


class EmbeddingPairs:
    def __init__(self, stack):
        self.stack = stack
        self.workers: list[proc.Child] = []
        self.batchers: list[proc.Child] = []
        self.ports: list[int] = []

    @property
    def wanted(self) -> int:
        cfg = self.stack.cfg
        return max(0, cfg.embedding_workers) if cfg.embedding_model else 0

    @property
    def count(self) -> int:
        return len(self.batchers)

    @staticmethod
    def worker_id(i: int) -> str:
        return f"e{i}"

    def children(self) -> list[proc.Child]:
        return [*self.workers, *self.batchers]

    def _spawn_worker(self, i: int) -> proc.Child:
        s, wid = self.stack, self.worker_id(i)
        name = f"worker-{wid}"
        return proc.spawn(name, proc.python_module(
            "workers.embedding_service", "--config", str(s.config_path), "--port", str(self.ports[i]),
            "--worker-id", wid, *s._metrics_args(name)), s.log_dir)

    def _spawn_batcher(self, i: int) -> proc.Child:
        s, wid = self.stack, self.worker_id(i)
        name = f"batcher-{wid}"
        return proc.spawn(name, proc.python_module(
            "batcher.embedding_batcher", "--config", str(s.config_path), "--worker-id", wid,
            "--worker-addr", f"{s.cfg.host}:{self.ports[i]}", *s._metrics_args(name)), s.log_dir)

    def start(self) -> None:
        for i in range(self.wanted):
            self.ports.append(free_port(self.stack.cfg.host))
            self.workers.append(self._spawn_worker(i))
            self.batchers.append(self._spawn_batcher(i))

    # ---- supervision (services/supervision.py Unit names and members) ----------------------------
    def unit_members(self) -> dict[str, list[str]]:
        return {self.worker_id(i): [f"worker-{self.worker_id(i)}", f"batcher-{self.worker_id(i)}"]
                for i in range(self.count)}

    def owns(self, unit_name: str) -> bool:
        return unit_name in self.unit_members()

    def members(self, unit_name: str) -> list[proc.Child]:
        i = int(unit_name[1:])
        return [self.workers[i], self.batchers[i]]

    def respawn(self, unit_name: str) -> None:
        i = int(unit_name[1:])
        self.workers[i] = self._spawn_worker(i)   # the worker first: its batcher waits for it
        self.batchers[i] = self._spawn_batcher(i)

    def stop(self, batcher_timeout: float) -> None:
        proc.stop_all(self.batchers, batcher_timeout)
        proc.stop_all(self.workers, 5.0)

    def snapshot(self) -> dict:
        return {self.worker_id(i): {"worker_pid": w.pid, "batcher_pid": b.pid, "port": self.ports[i],
                                    "model": self.stack.cfg.embedding_model}
                for i, (w, b) in enumerate(zip(self.workers, self.batchers))}
