"""A real model-pool stack for tests/pool: `switchyard up` with a catalogue of random:tiny models.

alpha (chat, summarize; $2/h; 0.5 GB; 1..2 replicas), beta (code, sql; $0.5/h; 0.5 GB; 1 replica;
versions v1, v2) and gamma (code; $0.3/h; 1.0 GB; 0..1 replicas, loaded on demand) on two 1 GB
worker slots, with a fast scaler (target 2 requests per replica, 0.5 s up, 3 s down, 8 s to zero);
one LoRA adapter, alpha-support (support), on alpha.
"""
from __future__ import annotations

import asyncio
import collections
import os
import time
from pathlib import Path

import grpc
import pytest

from tests.e2e.conftest import start_stack

ADMIN, USER = "test-admin-token", "test-user-token"

CATALOG = f"""
[stack]
admin_tokens = ["{ADMIN}"]
tokens = ["{USER}"]
num_kv_blocks = 256
max_num_seqs = 16

[pool]
slots = 2
slot_memory_gb = 1.0
default_model = "alpha"
load_timeout_s = 120

[pool.scaler]
target_per_replica = 2
scale_up_window_s = 0.5
scale_down_window_s = 3.0
idle_to_zero_s = 8
interval_s = 0.25

[[models]]
name = "alpha"
source = "random:tiny"
capabilities = ["chat", "summarize"]
max_context = 512
min_replicas = 1
max_replicas = 2
memory_gb = 0.5
gpu_usd_per_hour = 2.0

[[models]]
name = "beta"
source = "random:tiny"
capabilities = ["code", "sql"]
max_context = 512
min_replicas = 1
max_replicas = 1
memory_gb = 0.5
gpu_usd_per_hour = 0.5
[models.versions]
v2 = "random:tiny"

[[models]]
name = "gamma"
source = "random:tiny"
capabilities = ["code"]
max_context = 512
min_replicas = 0
max_replicas = 1
memory_gb = 1.0
gpu_usd_per_hour = 0.3

[[adapters]]                 # written by the fixture (bench.lora_bench.write_peft_adapter)
name = "alpha-support"
base = "alpha"
path = "alpha-support"
capabilities = ["support"]

[[intents]]
capability = "code"
keywords = ["python", "bug"]
regex = ['\\bdef\\s+\\w+\\(']

[[intents]]
capability = "summarize"
keywords = ["summarize"]
"""


def procs_mentioning(text: str) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if text in cmd and (p / "stat").read_text().split()[2] != "Z":
                out.append(int(p.name))
        except OSError:
            pass
    return out


@pytest.fixture(scope="session")
def pool_stack(tmp_path_factory):
    wd = tmp_path_factory.mktemp("pool")
    from bench.lora_bench import write_peft_adapter
    from workers.engine.loader import RANDOM_SHAPES
    write_peft_adapter(wd / "alpha-support", RANDOM_SHAPES["tiny"], r=8, alpha=16, targets=["q_proj", "v_proj"],
                       seed=5, std=0.2)
    cat = wd / "pool.toml"
    cat.write_text(CATALOG)
    h = start_stack(wd / "stack", pool_config=str(cat), max_model_len=512, drain_grace_s=15.0)
    yield h
    leftovers = h.stop()
    time.sleep(0.5)
    stray = procs_mentioning(str(wd / "stack"))
    assert not leftovers and not stray, f"processes outlived the stack stop: {leftovers} {stray}"


def admin_md(token: str = ADMIN):
    return (("authorization", f"Bearer {token}"),)


def request(prompt: str = "hello", max_tokens: int = 4, **kw):
    from protos.switchyard.v1 import common_pb2, inference_pb2
    return inference_pb2.GenerateRequest(prompt=prompt, sampling=common_pb2.SamplingParams(max_tokens=max_tokens),
                                         **kw)


async def generate(stub, req, timeout: float = 120.0) -> dict:
    """One Generate -> {model, version, reason, worker, text}."""
    call = stub.Generate(req, timeout=timeout)
    text, worker = "", ""
    async for r in call:
        text += r.text
        worker = worker or r.worker_id
    md = dict(await call.initial_metadata())
    return {"model": md.get("x-switchyard-model"), "version": md.get("x-switchyard-model-version"),
            "reason": md.get("x-switchyard-route-reason"), "adapter": md.get("x-switchyard-adapter", ""),
            "worker": worker, "text": text}


class Traffic:
    """Continuous traffic: `n` loops each sending one request after another until stopped."""

    def __init__(self, router: str, n: int = 3, max_tokens: int = 8, **req_kw):
        self.router, self.n, self.max_tokens, self.req_kw = router, n, max_tokens, req_kw
        self.ok = 0
        self.failures: list[str] = []
        self.versions: collections.Counter = collections.Counter()
        self.workers: collections.Counter = collections.Counter()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def __aenter__(self):
        from protos.switchyard.v1 import inference_pb2_grpc
        from tests.e2e.conftest import channel
        self._ch = channel(self.router)
        stub = inference_pb2_grpc.InferenceStub(self._ch)

        async def loop(i):
            k = 0
            while not self._stop.is_set():
                k += 1
                try:
                    r = await generate(stub, request(f"request {i}-{k} about trains", self.max_tokens, **self.req_kw))
                    self.ok += 1
                    self.versions[r["version"]] += 1
                    self.workers[r["worker"]] += 1
                except grpc.aio.AioRpcError as e:
                    self.failures.append(f"{e.code().name}: {e.details()}")
        self._tasks = [asyncio.create_task(loop(i)) for i in range(self.n)]
        return self

    async def __aexit__(self, *exc):
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._ch.close()
