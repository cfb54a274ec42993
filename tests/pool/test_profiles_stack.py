"""Deployment profiles through a real pool (issue 19 item 4): `switchyard up --pool` with one model in
two profiles, online (4 seats, 32-token budget) and offline (32 seats, 512-token budget), one replica
each. An interactive request lands on the online replica, a batch one on the offline replica, a
request naming the profile on that one whatever its class, and each replica runs its profile's engine
keys."""
from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from protos.switchyard.v1 import inference_pb2, inference_pb2_grpc
from tests.e2e.conftest import channel
from tests.pool.conftest import procs_mentioning, request

CATALOG = """
[pool]
slots = 2
slot_memory_gb = 1.0
default_model = "m"

[pool.scaler]
enabled = false

[[models]]
name = "m"
source = "random:tiny"
max_context = 256
memory_gb = 0.5

[models.profiles.online]
min_replicas = 1
max_replicas = 1
[models.profiles.online.engine]
max_num_seqs = 4
max_num_batched_tokens = 32

[models.profiles.offline]
min_replicas = 1
max_replicas = 1
[models.profiles.offline.engine]
max_num_seqs = 32
max_num_batched_tokens = 512
"""


@pytest.fixture(scope="module")
def profiles_pool(tmp_path_factory):
    from tests.e2e.conftest import start_stack
    wd = tmp_path_factory.mktemp("pool_profiles")
    (wd / "pool.toml").write_text(CATALOG)
    h = start_stack(wd / "stack", pool_config=str(wd / "pool.toml"), max_model_len=256, num_kv_blocks=64,
                    drain_grace_s=5.0)
    yield h, wd / "stack"
    leftovers = h.stop()
    assert not leftovers and not procs_mentioning(str(wd / "stack")), f"processes outlived the stack: {leftovers}"


async def _generate(stub, req) -> tuple[str, dict]:
    call = stub.Generate(req, timeout=120)
    worker = ""
    async for r in call:
        worker = worker or r.worker_id
    return worker, dict(await call.initial_metadata())


def test_service_class_and_name_pick_the_profiles_replica(profiles_pool):
    h, stack_dir = profiles_pool

    async def main():
        async with channel(h.router) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            listed = {m.name: m for m in (await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=10)).models}
            got = {}
            for key, kw in {"interactive": dict(service_class="interactive"), "batch": dict(service_class="batch"),
                            "none": {}, "named": dict(model="m:offline", service_class="interactive"),
                            "bare": dict(model="m", service_class="batch")}.items():
                got[key] = await _generate(stub, request(f"a {key} request about trains", 4, **kw))
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _generate(stub, request("x", 2, model="m:fast"))
            return listed, got, e.value
    listed, got, err = asyncio.run(main())
    assert sorted(listed) == ["m:offline", "m:online"]
    assert all(m.state == "ready" and m.replicas == 1 for m in listed.values())
    on, off = listed["m:online"].workers[0], listed["m:offline"].workers[0]
    assert on != off
    want = {"interactive": (on, "online"), "batch": (off, "offline"), "none": (on, "online"),
            "named": (off, "offline"), "bare": (off, "offline")}
    for key, (worker, profile) in want.items():
        w, md = got[key]
        assert (w, md["x-switchyard-profile"], md["x-switchyard-model"]) == (worker, profile, "m"), key
    assert "serves service class 'batch'" in got["batch"][1]["x-switchyard-route-reason"]
    assert "profile 'offline' named in the request" in got["named"][1]["x-switchyard-route-reason"]
    assert err.code() == grpc.StatusCode.NOT_FOUND and "no deployment profile 'fast'" in err.details()
    # each replica was started with its own profile's engine keys
    engines = {p: json.loads((stack_dir / "pool" / f"m-{p}@v1.json").read_text())["engine"]
               for p in ("online", "offline")}
    assert (engines["online"]["max_num_seqs"], engines["online"]["max_num_batched_tokens"]) == (4, 32)
    assert (engines["offline"]["max_num_seqs"], engines["offline"]["max_num_batched_tokens"]) == (32, 512)
