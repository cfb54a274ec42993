"""A configured LoRA adapter end to end: router (validates against heartbeats) -> batcher -> worker."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from batcher.engine import Engine
from bench.lora_bench import write_peft_adapter
from protos.switchyard.v1 import inference_pb2_grpc
from tests.e2e.conftest import channel, collect, gen_request, start_stack
from workers.engine.sampling_params import SamplingParams

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def lora_stack(tmp_path_factory):
    import json

    from workers.engine.loader import model_config_from_hf, smollm2_dir
    d = smollm2_dir()
    mc = model_config_from_hf(json.loads((d / "config.json").read_text()))
    root = tmp_path_factory.mktemp("lora_e2e")
    path = write_peft_adapter(root / "ad1", mc, r=8, alpha=16, targets=["q_proj", "v_proj", "down_proj"], seed=11,
                              std=0.05)
    h = start_stack(root / "stack", workers=1, lora_adapters={"ad1": str(path)}, max_loras=2)
    yield h, path
    leftovers = h.stop()
    assert not leftovers, f"processes outlived the stack stop: {leftovers}"


def test_adapter_request_equals_in_process_engine(lora_stack):
    h, path = lora_stack
    eng = Engine.from_model("smollm2-135m", num_kv_blocks=64, max_model_len=512, lora_adapters={"ad1": str(path)})
    sp = SamplingParams(max_tokens=10, temperature=0.0)
    want = eng.generate(PROMPT, sp, adapter_ids=["ad1"])[0]
    base = eng.generate(PROMPT, sp)[0]
    assert want.token_ids != base.token_ids, "the adapter must change the output"

    async def main():
        async with channel(h.router) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            got = await collect(stub, gen_request(PROMPT, max_tokens=10, adapter_id="ad1"))
            plain = await collect(stub, gen_request(PROMPT, max_tokens=10))
            try:
                await collect(stub, gen_request(PROMPT, max_tokens=2, adapter_id="nope"))
                code = None
            except grpc.aio.AioRpcError as e:
                code, msg = e.code(), e.details()
            return got, plain, code, msg
    (text, ids, _), (_, plain_ids, _), code, msg = asyncio.run(main())
    assert ids == want.token_ids and text == want.text
    assert plain_ids == base.token_ids
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in msg and "ad1" in msg
