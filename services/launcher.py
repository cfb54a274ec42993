"""`switchyard up`: nats-server, kv_manager, router and N batcher+worker pairs as child processes.

Start order: nats -> kv_manager -> workers -> batchers -> router; ready when the router reports
every worker healthy. Stop order (SIGTERM / Ctrl-C) is the drain: router first (NOT_SERVING,
open streams finish within the grace period), then batchers, workers, kv_manager, nats last.
Every child lives in its own process group and dies with the launcher (services/proc.py).
"""
from __future__ import annotations

import json
import signal
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from services import nats_server, proc
from services.config import StackConfig, write_config
from services.ports import check_free, free_port


class StackError(RuntimeError):
    pass


class Stack:
    def __init__(self, cfg: StackConfig, workdir: str | Path | None = None):
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="switchyard-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_dir = self.workdir / "logs"
        self.cfg = self._resolve_ports(cfg)
        self.config_path = write_config(self.cfg, self.workdir / "stack-config.json")
        self.nats: proc.Child | None = None
        self.kv_manager: proc.Child | None = None
        self.router: proc.Child | None = None
        self.workers: list[proc.Child] = []
        self.batchers: list[proc.Child] = []
        self.worker_ports: list[int] = []

    @staticmethod
    def _resolve_ports(cfg: StackConfig) -> StackConfig:
        """Port 0 -> a free port now; a configured port that is taken -> a clear error."""
        h = cfg.host
        pick = lambda p, what: free_port(h) if p == 0 else check_free(p, what, h)  # noqa: E731
        return replace(cfg, router_port=pick(cfg.router_port, "router"), nats_port=pick(cfg.nats_port, "nats"),
                       kv_manager_port=pick(cfg.kv_manager_port, "kv_manager"))

    @property
    def children(self) -> list[proc.Child]:
        return [c for c in [self.nats, self.kv_manager, *self.workers, *self.batchers, self.router] if c]

    @property
    def router_address(self) -> str:
        return self.cfg.router_address

    def worker_id(self, i: int) -> str:
        return f"w{i}"

    # ---- start ---------------------------------------------------------------------------------
    def start(self) -> "Stack":
        cfg, conf = self.cfg, str(self.config_path)
        try:
            self.nats = nats_server.start(cfg.host, cfg.nats_port, self.workdir, cfg.nats_max_payload, self.log_dir)
            self.kv_manager = proc.spawn("kv_manager", proc.python_module(
                "kv_manager.main", "--config", conf, "--port", str(cfg.kv_manager_port)), self.log_dir)
            for i in range(cfg.workers):
                port = free_port(cfg.host) if cfg.worker_base_port == 0 else check_free(
                    cfg.worker_base_port + i, f"worker {i}", cfg.host)
                self.worker_ports.append(port)
                self.workers.append(proc.spawn(f"worker-{self.worker_id(i)}", proc.python_module(
                    "workers.main", "--config", conf, "--port", str(port), "--worker-id", self.worker_id(i)),
                    self.log_dir))
            for i, port in enumerate(self.worker_ports):
                self.batchers.append(proc.spawn(f"batcher-{self.worker_id(i)}", proc.python_module(
                    "batcher.main", "--config", conf, "--worker-id", self.worker_id(i),
                    "--worker-addr", f"{cfg.host}:{port}"), self.log_dir))
            self.router = proc.spawn("router", proc.python_module(
                "router.main", "--config", conf, "--port", str(cfg.router_port)), self.log_dir)
            self.wait_healthy(cfg.startup_timeout_s)
        except BaseException:
            self.stop(drain=False)
            raise
        self._write_state()
        return self

    def wait_healthy(self, timeout: float) -> None:
        """Until the router answers SERVING and lists every worker healthy (or a child dies)."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from protos.switchyard.v1 import inference_pb2_grpc, kv_index_pb2

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.router_address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            admin = inference_pb2_grpc.AdminStub(ch)
            while True:
                for c in self.children:
                    if not c.alive():
                        raise StackError(f"{c.name} exited with code {c.popen.returncode} during start-up; "
                                         f"last log lines ({c.log_path}):\n{c.tail()}")
                try:
                    h = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if h.status == health_pb2.HealthCheckResponse.SERVING:
                        st = admin.Status(kv_index_pb2.StatusRequest(), timeout=2.0)
                        if sum(1 for w in st.workers if w.healthy) >= self.cfg.workers:
                            return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise StackError(f"stack not healthy after {timeout:.0f}s; logs in {self.log_dir}")
                time.sleep(0.2)

    def _write_state(self) -> None:
        state = {"router": self.router_address, "nats": self.cfg.nats_url, "kv_manager": self.cfg.kv_manager_address,
                 "workdir": str(self.workdir), "logs": str(self.log_dir),
                 "pids": {c.name: c.pid for c in self.children},
                 "workers": {self.worker_id(i): {"worker_pid": w.pid, "batcher_pid": b.pid,
                                                 "port": self.worker_ports[i]}
                             for i, (w, b) in enumerate(zip(self.workers, self.batchers))}}
        (self.workdir / "stack.json").write_text(json.dumps(state, indent=1))

    # ---- stop ----------------------------------------------------------------------------------
    def stop(self, drain: bool = True) -> None:
        """Drain in dependency order; SIGKILL whatever outlives its timeout."""
        grace = self.cfg.drain_grace_s if drain else 0.5
        if self.router:
            self.router.stop(grace + 5.0)
        proc.stop_all(self.batchers, grace + 5.0 if drain else 2.0)
        proc.stop_all(self.workers, 5.0)
        proc.stop_all([c for c in (self.kv_manager,) if c], 5.0)
        if self.nats:
            self.nats.stop(5.0)

    def dead_children(self) -> list[proc.Child]:
        return [c for c in self.children if not c.alive()]


def run_up(cfg: StackConfig, workdir: str | None = None, out=sys.stdout, demo: str | None = None) -> int:
    """Foreground `switchyard up`: start, print the router address, block until SIGTERM/Ctrl-C."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stack = Stack(cfg, workdir)
    print(f"switchyard: starting {cfg.workers} worker(s) of {cfg.model}; logs in {stack.log_dir}", file=out, flush=True)
    try:
        stack.start()
    except Exception as e:
        print(f"switchyard: failed to start: {e}", file=sys.stderr, flush=True)
        return 1
    print(f"switchyard: router listening on {stack.router_address}", file=out, flush=True)
    print(f"switchyard: ready (state in {stack.workdir / 'stack.json'}); Ctrl-C to stop", file=out, flush=True)
    if demo:
        from services.client import stream_generate
        print(f"switchyard: demo> {demo}", file=out, flush=True)
        stream_generate(stack.router_address, demo, max_tokens=96, chat=True, out=out)
        print(f"switchyard: try `switchyard generate \"...\" --router {stack.router_address}`; "
              f"Ctrl-C to stop", file=out, flush=True)
    reported: set[str] = set()
    rc = 0
    while not stop.wait(0.25):
        for c in stack.dead_children():
            if c.name not in reported:
                reported.add(c.name)
                print(f"switchyard: {c.name} exited with code {c.popen.returncode}", file=sys.stderr, flush=True)
        if stack.router and not stack.router.alive() or stack.nats and not stack.nats.alive():
            rc = 1
            break
    print("switchyard: draining", file=out, flush=True)
    stack.stop(drain=True)
    print("switchyard: stopped", file=out, flush=True)
    return rc
