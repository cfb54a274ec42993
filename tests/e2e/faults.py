"""Helpers the fault tests share (test_liveness.py, test_migration.py): streams that record what they
got while a test breaks something under them, /metrics scrapes, stack.json and waits."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request

import grpc

from tests.e2e.conftest import channel, gen_request

MODEL = "smollm2-135m"
PROMPTS = ["Once upon a time, in a small village by the sea,", "The history of the printing press",
           "def fibonacci(n):", "A recipe for bread: first,"]


def request(i: int, max_tokens: int, **kw):
    """Greedy, EOS ignored: a fixed length, and the text an undisturbed run must reproduce."""
    r = gen_request(PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens, model=MODEL, **kw)
    r.sampling.ignore_eos = True
    return r


class Stream:
    """One Generate as a task: responses land in `got` as they arrive; `error` if it failed."""

    def __init__(self, stub, req, timeout: float = 180.0):
        self.got: list = []
        self.error: grpc.aio.AioRpcError | None = None
        self.task = asyncio.ensure_future(self._run(stub, req, timeout))

    async def _run(self, stub, req, timeout: float) -> None:
        try:
            async for r in stub.Generate(req, timeout=timeout):
                self.got.append(r)
        except grpc.aio.AioRpcError as e:
            self.error = e

    @property
    def worker(self) -> str:
        return self.got[0].worker_id if self.got else ""

    @property
    def text(self) -> str:
        return "".join(r.text for r in self.got)

    @property
    def token_ids(self) -> list[int]:
        return [t for r in self.got for t in r.token_ids]

    @property
    def finished(self) -> bool:
        return bool(self.got) and self.got[-1].finish_reason != 0   # FINISH_REASON_UNSPECIFIED


async def undisturbed(router: str, n: int, max_tokens: int) -> list[tuple[str, list[int]]]:
    """(text, token ids) of requests 0..n-1 run side by side with nothing broken."""
    from protos.switchyard.v1 import inference_pb2_grpc
    async with channel(router) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        streams = [Stream(stub, request(i, max_tokens)) for i in range(n)]
        await asyncio.gather(*(s.task for s in streams))
    for s in streams:
        assert s.error is None and s.finished, s.error
    return [(s.text, s.token_ids) for s in streams]


async def wait_until(what: str, cond, timeout: float, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}: not after {timeout}s"
        await asyncio.sleep(every)


def state(h) -> dict:
    return json.loads((h.workdir / "stack.json").read_text())


def signal_group(pid: int, sig: int) -> None:
    os.killpg(pid, sig)


def metric(h, child: str, name: str, **labels) -> float:
    """The sum of a child's /metrics samples called `name` whose labels include `labels` (0 if none)."""
    from prometheus_client.parser import text_string_to_metric_families
    addr = state(h)["metrics"][child]
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def worker_view(h, worker_id: str) -> dict | None:
    """The router's status line for a worker (None: not in its table)."""
    return next((w for w in h.status()["workers"] if w["worker_id"] == worker_id), None)


__all__ = ["MODEL", "Stream", "metric", "request", "signal", "signal_group", "state", "undisturbed", "wait_until",
           "worker_view"]
