"""Real stacks for the e2e tests: `switchyard up` as a child process on free loopback ports.

`stack` (session): one worker, shared by most tests. `start_stack(...)` starts others (the
2-worker stack lives in test_two_workers.py). Every stack is stopped at the end - also when a
test fails - and the test fails if any of its processes outlives the stop.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

REPO = Path(__file__).resolve().parents[2]

# Small KV cache and context so a stack starts fast and "prompt over the context" is cheap.
BASE_CONFIG = dict(router_port=0, nats_port=0, kv_manager_port=0, worker_base_port=0,
                   num_kv_blocks=512, max_model_len=512, max_num_seqs=16, max_waiting=64,
                   drain_grace_s=15.0, heartbeat_interval_s=0.5, worker_timeout_s=3.0, startup_timeout_s=240.0)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


class StackHandle:
    def __init__(self, workdir: Path, **overrides):
        self.workdir = workdir
        cfg = dict(BASE_CONFIG, **overrides)
        self.config_path = workdir / "config.json"
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(cfg))
        self.out_path = workdir / "launcher.out"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "up", "--config", str(self.config_path), "--workdir", str(workdir)],
            cwd=REPO, stdout=open(self.out_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        self.state: dict = {}

    def wait_ready(self, timeout: float = 240.0) -> "StackHandle":
        deadline = time.monotonic() + timeout
        state_file = self.workdir / "stack.json"
        while not state_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"switchyard up exited {self.proc.returncode}:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"stack not ready after {timeout}s:\n{self.logs()}")
            time.sleep(0.2)
        self.state = json.loads(state_file.read_text())
        return self

    @property
    def router(self) -> str:
        return self.state["router"]

    def all_pids(self) -> list[int]:
        return [self.proc.pid, *self.state.get("pids", {}).values()]

    def logs(self) -> str:
        parts = [self.out_path.read_text(errors="replace") if self.out_path.exists() else ""]
        for f in sorted((self.workdir / "logs").glob("*.log")):
            parts.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-20:]))
        return "\n".join(parts)

    def sigterm(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60.0) -> list[int]:
        """SIGTERM the launcher, wait; kill anything left. Returns the pids that had to be killed."""
        self.sigterm()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        leftovers = [p for p in self.all_pids() if pid_alive(p)]
        for p in leftovers:
            try:
                os.killpg(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.proc.poll() is None:
            self.proc.wait(5)
        return leftovers

    def status(self) -> dict:
        from services.cli import status_dict
        return status_dict(self.router)

    def worker_status(self, worker_id: str = "w0") -> dict:
        return next(w for w in self.status()["workers"] if w["worker_id"] == worker_id)

    def worker_status_since(self, since: float, worker_id: str = "w0", until=None, timeout: float = 60.0) -> dict:
        """The worker's status from a heartbeat the router received after `since` (time.monotonic()),
        and, with `until`, the first such one for which until(status) holds. Heartbeat-fed counters are
        only as new as the last heartbeat: this waits for one instead of sleeping past the interval."""
        deadline = time.monotonic() + timeout
        while True:
            asked = time.monotonic()
            w = self.worker_status(worker_id)
            if asked - w["last_seen_ms_ago"] / 1000.0 > since and (until is None or until(w)):
                return w
            assert time.monotonic() < deadline, f"no heartbeat from {worker_id} after {since} satisfying it: {w}"
            time.sleep(0.05)


def start_stack(workdir: Path, **overrides) -> StackHandle:
    h = StackHandle(workdir, **overrides)
    try:
        return h.wait_ready()
    except BaseException:
        h.stop(10)
        raise


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    h = start_stack(tmp_path_factory.mktemp("stack1"), workers=1)
    yield h
    leftovers = h.stop()
    assert not leftovers, f"processes outlived the stack stop: {leftovers}"


@pytest.fixture(scope="session")
def engine():
    """The in-process reference engine (same model, greedy)."""
    from batcher.engine import Engine
    return Engine.from_model("smollm2-135m", num_kv_blocks=256, max_model_len=512)


def channel(target: str) -> grpc.aio.Channel:
    from common.rpc import options
    return grpc.aio.insecure_channel(target, options=options())


def gen_request(prompt: str = "", max_tokens: int = 8, temperature: float = 0.0, model: str = "smollm2-135m", **kw):
    from protos.switchyard.v1 import common_pb2, inference_pb2
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature)
    return inference_pb2.GenerateRequest(model=model, prompt=prompt, sampling=sampling, **kw)


async def collect(stub, req, timeout: float = 120.0):
    """Run one Generate; returns (text, token_ids, responses)."""
    text, ids, resps = "", [], []
    async for r in stub.Generate(req, timeout=timeout):
        text += r.text
        ids.extend(r.token_ids)
        resps.append(r)
    return text, ids, resps
