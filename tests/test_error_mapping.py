"""Errors carry their gRPC status and message as data (workers/engine/errors.py), and the worker
answers with that status: INVALID_ARGUMENT only for the caller's mistakes (an adapter that cannot be
served or read), ALREADY_EXISTS, NOT_FOUND; INTERNAL for a bug in the worker. No text re-parsing."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from bench.lora_bench import write_peft_adapter
from protos.switchyard.v1 import common_pb2, worker_pb2
from router.validation import RequestError, check_sampling
from workers.engine.config import ModelConfig
from workers.engine.errors import EngineError, InvalidRequestError, QueueFullError, UnknownAdapterError
from workers.engine.lora import AdapterManager, InvalidAdapterError
from workers.service import WorkerServicer

CFG = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16)


def test_errors_carry_code_field_and_message():
    e = InvalidRequestError("top_p", "must be in (0, 1], got 2")
    assert (e.code, e.field, e.message) == ("INVALID_ARGUMENT", "top_p", "must be in (0, 1], got 2")
    assert str(e) == "top_p: must be in (0, 1], got 2"    # logs and the bus keep "field: message"
    a = InvalidAdapterError("x", "rank r=32 exceeds this engine's max_lora_rank=16")
    assert (a.code, a.field, a.message) == ("INVALID_ARGUMENT", "adapter_id",
                                            "adapter 'x': rank r=32 exceeds this engine's max_lora_rank=16")
    u = UnknownAdapterError("adapter 'x' is not served")
    assert (u.code, u.field, str(u)) == ("NOT_FOUND", "adapter_id", "adapter 'x' is not served")
    q = QueueFullError("queue is full", retry_after_ms=300)
    assert (q.code, q.retry_after_ms, q.field) == ("RESOURCE_EXHAUSTED", 300, "")
    assert all(isinstance(x, EngineError) for x in (e, a, u, q))


def test_the_router_names_the_field_once():
    with pytest.raises(RequestError) as e:
        check_sampling(common_pb2.SamplingParams(max_tokens=4, top_p=2.0))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.field == "top_p"
    assert e.value.message == "top_p: must be in (0, 1], got 2.0"


# ---- Worker/LoadAdapter ----------------------------------------------------------------------------
class Aborted(Exception):
    pass


class Context:
    def __init__(self):
        self.status = None

    async def abort(self, code, message):
        self.status = (code, message)
        raise Aborted(message)


class Runner:
    def __init__(self):
        self.lora = AdapterManager(CFG, max_loras=1, max_lora_rank=4)
        self.seqs: dict = {}


def load(svc: WorkerServicer, name: str, path) -> tuple[grpc.StatusCode | None, str]:
    ctx = Context()

    async def call():
        try:
            await svc.LoadAdapter(worker_pb2.WorkerAdapterRequest(name=name, path=str(path)), ctx)
        except Aborted:
            pass
    asyncio.run(call())
    return ctx.status or (None, "")


@pytest.fixture
def worker():
    svc = WorkerServicer(Runner(), "fake-model")
    svc.ready = True
    return svc


def test_load_adapter_maps_each_error_to_its_status(worker, tmp_path):
    ok = write_peft_adapter(tmp_path / "ok", CFG, r=2, alpha=4, targets=["q_proj"], seed=1)
    assert load(worker, "ok", ok) == (None, "")

    too_big = write_peft_adapter(tmp_path / "big", CFG, r=8, alpha=8, targets=["q_proj"], seed=2)
    code, msg = load(worker, "big", too_big)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg == "adapter 'big': rank r=8 exceeds this engine's " \
                                                               "max_lora_rank=4"

    broken = write_peft_adapter(tmp_path / "broken", CFG, r=2, alpha=4, targets=["q_proj"], seed=3)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    code, msg = load(worker, "broken", broken)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("adapter 'broken': cannot read ")

    code, msg = load(worker, "ok", too_big)
    assert code == grpc.StatusCode.ALREADY_EXISTS and "unload it first" in msg
    assert worker.runner.lora.names() == ["ok"]   # the refused ones were forgotten again


def test_a_bug_while_loading_is_internal_not_the_callers_fault(worker, tmp_path, monkeypatch, caplog):
    path = write_peft_adapter(tmp_path / "a", CFG, r=2, alpha=4, targets=["q_proj"], seed=1)

    def broken_prefetch(name):
        raise RuntimeError("slot bookkeeping bug")
    monkeypatch.setattr(worker.runner.lora, "prefetch", broken_prefetch)
    code, msg = load(worker, "a", path)
    assert code == grpc.StatusCode.INTERNAL and "RuntimeError: slot bookkeeping bug" in msg
    assert "LoadAdapter 'a'" in caplog.text            # logged with its traceback
    assert "a" not in worker.runner.lora.registry      # and not left half-registered
