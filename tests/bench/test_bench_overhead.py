"""`switchyard bench overhead` end to end (bare engine, a real stack it starts, and the no-op gRPC
floor server), and the floor server on its own."""
from __future__ import annotations

import asyncio
import json

from bench.grpc_floor import floor_server
from common.ports import is_free
from services.cli import main as cli


def test_bench_overhead_reports_engine_stack_platform_and_floor(tmp_path):
    out = tmp_path / "overhead.json"
    rc = cli(["bench", "overhead", "--model", "random:tiny", "--rounds", "1", "--streams", "2", "--max-tokens", "3",
              "--num-kv-blocks", "64", "--max-model-len", "128", "--json", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    for side in ("engine", "stack"):
        assert rep[side]["requests"] == 2 and rep[side]["tokens"] == 6, rep[side]   # ignore_eos: all max_tokens
    assert rep["stack"]["platform_ttft_p50_ms"] > 0
    assert set(rep["added"]) == {"ttft_p50_added_ms", "ttft_p99_added_ms", "itl_p50_added_ms", "itl_p99_added_ms"}
    floor = rep["grpc_floor"]
    assert 0 < floor["ttft_p50_ms"] <= floor["ttft_p99_ms"]


def test_floor_server_answers_one_finished_chunk_and_stops(tmp_path):
    from common.rpc import channel
    from protos.switchyard.v1 import inference_pb2, inference_pb2_grpc

    async def call(addr):
        async with channel(addr) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            return [r async for r in stub.Generate(inference_pb2.GenerateRequest(prompt="x", request_id="f1"))]

    with floor_server(tmp_path) as addr:
        resps = asyncio.run(call(addr))
        port = int(addr.rsplit(":", 1)[1])
        assert not is_free(port)
    assert len(resps) == 1 and resps[0].request_id == "f1" and resps[0].finish_reason == 2
    assert list(resps[0].token_ids) == [0]
    assert is_free(port), "the floor server still holds its port after the block"
