"""One real traced stack for the telemetry tests: `switchyard up --trace-file F --otlp-endpoint E`.

Two batcher+worker pairs (so the router asks the KV index, and the trace crosses every service),
exporting to an in-process OTLP receiver (telemetry/otlp_sink.py) and to a trace file at once.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from telemetry.otlp_sink import OtlpSink
from tests.e2e.conftest import BASE_CONFIG, pid_alive

REPO = Path(__file__).resolve().parents[2]
# >= 16 tokens (one KV block), so the router computes block hashes and calls KvIndex/Match.
LONG_PROMPT = ("The history of railway switching yards begins in the nineteenth century, when freight trains "
               "grew too long for a single siding and railways needed a place to sort their cars by destination.")


def generate(router: str, request_id: str, metadata=None, max_tokens: int = 4) -> list:
    """One Generate of LONG_PROMPT; returns the responses."""
    import asyncio

    from protos.switchyard.v1 import inference_pb2_grpc
    from tests.e2e.conftest import channel, gen_request

    async def main():
        async with channel(router) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            req = gen_request(LONG_PROMPT, max_tokens=max_tokens, request_id=request_id)
            return [r async for r in stub.Generate(req, timeout=120, metadata=metadata)]
    return asyncio.run(main())


class TracedStack:
    def __init__(self, workdir: Path, sink: OtlpSink, workers: int = 2):
        self.workdir = workdir
        self.sink = sink
        self.trace_file = workdir / "trace.jsonl"
        cfg = dict(BASE_CONFIG, workers=workers, max_num_seqs=8)
        (workdir / "config.json").write_text(json.dumps(cfg))
        self.out = workdir / "launcher.out"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "up", "--config", str(workdir / "config.json"),
             "--workdir", str(workdir), "--trace-file", str(self.trace_file), "--otlp-endpoint", sink.endpoint],
            cwd=REPO, stdout=open(self.out, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        self.state: dict = {}

    def wait_ready(self, timeout: float = 180.0) -> "TracedStack":
        deadline = time.monotonic() + timeout
        state = self.workdir / "stack.json"
        while not state.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"switchyard up exited {self.proc.returncode}:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"stack not ready after {timeout}s:\n{self.logs()}")
            time.sleep(0.2)
        self.state = json.loads(state.read_text())
        return self

    @property
    def router(self) -> str:
        return self.state["router"]

    def logs(self) -> str:
        parts = [self.out.read_text(errors="replace") if self.out.exists() else ""]
        for f in sorted((self.workdir / "logs").glob("*.log")):
            parts.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-20:]))
        return "\n".join(parts)

    def stop(self) -> list[int]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        left = [p for p in [self.proc.pid, *self.state.get("pids", {}).values()] if pid_alive(p)]
        for p in left:
            try:
                os.killpg(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        return left


@pytest.fixture(scope="session")
def otlp_sink():
    with OtlpSink() as sink:
        yield sink


@pytest.fixture(scope="session")
def traced_stack(tmp_path_factory, otlp_sink):
    h = TracedStack(tmp_path_factory.mktemp("traced"), otlp_sink)
    try:
        h.wait_ready()
    except BaseException:
        h.stop()
        raise
    yield h
    left = h.stop()
    assert not left, f"processes outlived the stack stop: {left}"
