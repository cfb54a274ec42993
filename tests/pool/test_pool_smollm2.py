"""The model pool with the real model (tests/pool/test_pool_stack.py runs only random-weight ones): a
catalogue entry whose source is the built-in SmolLM2, started by the pool as a replica (batcher +
worker pair), answers token for token as the in-process engine does."""
from __future__ import annotations

import asyncio

import pytest

from protos.switchyard.v1 import inference_pb2, inference_pb2_grpc
from tests.e2e.conftest import channel
from tests.pool.conftest import procs_mentioning, request

CATALOG = """
[pool]
slots = 1
slot_memory_gb = 2.0
default_model = "smol"

[[models]]
name = "smol"
source = "smollm2-135m"
capabilities = ["chat"]
max_context = 512
min_replicas = 1
max_replicas = 1
memory_gb = 1.0
"""
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smol_pool(tmp_path_factory):
    from tests.e2e.conftest import start_stack
    wd = tmp_path_factory.mktemp("pool_smollm2")
    (wd / "pool.toml").write_text(CATALOG)
    h = start_stack(wd / "stack", pool_config=str(wd / "pool.toml"), max_model_len=512, drain_grace_s=5.0)
    yield h
    leftovers = h.stop()
    assert not leftovers and not procs_mentioning(str(wd / "stack")), f"processes outlived the stack: {leftovers}"


def test_a_pool_replica_of_smollm2_answers_like_the_engine(smol_pool):
    from batcher.engine import Engine
    from workers.engine import SamplingParams
    want = Engine.from_model("smollm2-135m", num_kv_blocks=64, max_model_len=512).generate(
        PROMPT, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]

    async def main():
        async with channel(smol_pool.router) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            listed = {m.name: m for m in (await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=10)).models}
            req = request(PROMPT, max_tokens=12, model="smol")
            req.sampling.temperature = 0.0
            req.sampling.ignore_eos = True
            call = stub.Generate(req, timeout=120)
            resps = [r async for r in call]
            return listed, dict(await call.initial_metadata()), resps
    listed, md, resps = asyncio.run(main())
    smol = listed["smol"]
    assert (smol.state, smol.source, smol.replicas) == ("ready", "smollm2-135m", 1)
    assert md["x-switchyard-model"] == "smol"
    assert [t for r in resps for t in r.token_ids] == want.token_ids
    assert "".join(r.text for r in resps) == want.text
    assert resps[-1].usage.completion_tokens == 12 and resps[-1].usage.prompt_tokens == len(want.prompt_token_ids)
