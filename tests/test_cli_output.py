"""What `switchyard status` and `switchyard generate -v` print, against a fake router in this process.

The fake serves Admin/Status, Inference/ListModels and Inference/Generate with fixed answers, so the
tests check only the CLI side: finding the launcher's state file, JSON types, the usage line.
"""
from __future__ import annotations

import asyncio
import io
import json
import sys
import tempfile
from concurrent import futures

import grpc
import pytest

from common.config import StackConfig
from protos.switchyard.v1 import bus_pb2, common_pb2, inference_pb2, inference_pb2_grpc, kv_index_pb2
from services.cli import main
from services.client import stream_generate
from services.launcher import state_pointer


class FakeRouter(inference_pb2_grpc.InferenceServicer, inference_pb2_grpc.AdminServicer):
    def Status(self, request, context):
        return kv_index_pb2.StatusResponse(indexed_blocks_total=7, workers=[kv_index_pb2.WorkerStatus(
            worker_id="w0", model="smollm2-135m", healthy=True, num_blocks=64, num_free_blocks=48, kv_usage=0.25,
            num_preemptions=2, prompt_tokens_total=1234, generation_tokens_total=56)])

    def ListModels(self, request, context):
        return inference_pb2.ListModelsResponse(models=[inference_pb2.ModelInfo(
            name="smollm2-135m", num_workers=1, state="ready", replicas=1, gpu_usd_per_hour=2.5, workers=["w0"])])

    def Generate(self, request, context):
        yield inference_pb2.GenerateResponse(text="Hello", worker_id="w0")
        yield inference_pb2.GenerateResponse(
            text=" there.", finish_reason=common_pb2.FINISH_REASON_STOP,
            usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=2, queue_ms=1.0, prefill_ms=2.0, decode_ms=3.0,
                                   worker_id="w0", cost_usd=0.000123))


@pytest.fixture
def fake_router():
    """The fake's port, on 127.0.0.1 (where the launcher binds the router)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    fake = FakeRouter()
    inference_pb2_grpc.add_InferenceServicer_to_server(fake, server)
    inference_pb2_grpc.add_AdminServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(0)


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    """Keep the launcher's state files (under the temp folder) out of the real one."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def write_state(router_address: str, state: dict) -> None:
    """What the launcher does once the stack is up: stack.json keyed by its router address."""
    pointer = state_pointer(router_address)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.write_text(json.dumps(state))


def test_status_json_finds_the_state_file_for_any_spelling_of_the_router(fake_router, state_dir, capsys):
    port = fake_router
    state = {"metrics": {"router": "127.0.0.1:9100"}, "trace_file": "/tmp/t.jsonl", "logs": "/tmp/sy/logs"}
    write_state(f"127.0.0.1:{port}", state)   # the launcher's host is 127.0.0.1
    for spelling in (f"localhost:{port}", f"127.0.0.1:{port}", f"0.0.0.0:{port}"):
        assert main(["status", "--json", "--router", spelling]) == 0
        st = json.loads(capsys.readouterr().out)
        assert st["metrics"] == state["metrics"], spelling
        assert st["trace_file"] == state["trace_file"] and st["logs"] == state["logs"], spelling


def test_state_file_key_is_the_same_for_every_spelling_of_this_machine():
    spellings = ["localhost:50051", "127.0.0.1:50051", "[::1]:50051", "0.0.0.0:50051", "[::]:50051",
                 "LOCALHOST:50051", "dns:///localhost:50051", "ipv4:127.0.0.1:50051", "127.0.1.1:50051"]
    assert {state_pointer(s) for s in spellings} == {state_pointer("127.0.0.1:50051")}
    assert state_pointer("localhost:50052") != state_pointer("localhost:50051")
    assert state_pointer("gpu-box-7:50051") != state_pointer("localhost:50051")


def test_status_json_token_counters_are_numbers(fake_router, state_dir, capsys):
    assert main(["status", "--json", "--router", f"127.0.0.1:{fake_router}"]) == 0
    w = json.loads(capsys.readouterr().out)["workers"][0]
    assert (w["prompt_tokens_total"], w["generation_tokens_total"], w["num_preemptions"]) == (1234, 56, 2)


def test_router_lists_the_configured_gpu_price_without_a_pool():
    """`switchyard status` shows the models table's $/h from ListModels: the stack config's price."""
    from router.service import Router
    cfg = StackConfig(gpu_usd_per_hour=1.75, gpu_usd_per_hour_by_worker={"w1": 3.0})
    router = Router(cfg, nc=None, kv_channel=None)

    def listed():
        resp = asyncio.run(router.ListModels(inference_pb2.ListModelsRequest(), None))
        return [(m.name, m.gpu_usd_per_hour) for m in resp.models]

    assert listed() == [(cfg.model, 1.75)]                 # no worker yet: the stack's price
    router.table.observe(bus_pb2.Heartbeat(worker_id="w1", model=cfg.model, healthy=True))
    assert listed() == [(cfg.model, 3.0)]                  # its worker's own price


def test_generate_verbose_prints_usage_with_cost_on_a_line_of_its_own(fake_router, monkeypatch):
    # Both streams on one pipe, as with `switchyard generate ... 2>&1 | less`: stdout is buffered
    # until flushed, stderr is not.
    pipe = io.BytesIO()
    out = io.TextIOWrapper(pipe, encoding="utf-8")
    err = io.TextIOWrapper(pipe, encoding="utf-8", write_through=True)
    monkeypatch.setattr(sys, "stderr", err)
    rc = stream_generate(f"127.0.0.1:{fake_router}", "Say hello", chat=True, verbose=True, out=out)
    out.flush()
    text = pipe.getvalue().decode()
    out.detach(), err.detach()
    assert rc == 0
    lines = text.splitlines()
    assert lines[0] == "Hello there."
    assert lines[1].startswith("[FINISH_REASON_STOP prompt=3 completion=2 ") and "cost=$0.000123" in lines[1]
