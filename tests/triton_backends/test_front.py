"""The Triton-protocol front door (`switchyard up --triton-port`) with a real tritonclient."""
from __future__ import annotations

import io
import queue
import time
from functools import partial

import numpy as np
import pytest

from tests.triton_backends.conftest import MODEL

PROMPT = "The capital of France is"


def _tg():
    from workers.backends.tritongrpc import load
    return load()[0]


def _inputs(text=PROMPT, max_tokens=10, stream=True, text_dtype="BYTES"):
    tg = _tg()
    ins = []
    if text is not None:
        t = tg.InferInput("text_input", [1], text_dtype)
        t.set_data_from_numpy(np.array([text.encode()], dtype=object) if text_dtype == "BYTES"
                              else np.array([7], dtype=np.int32))
        ins.append(t)
    s = tg.InferInput("stream", [1], "BOOL")
    s.set_data_from_numpy(np.array([stream]))
    m = tg.InferInput("max_tokens", [1], "INT32")
    m.set_data_from_numpy(np.array([max_tokens], dtype=np.int32))
    temp = tg.InferInput("temperature", [1], "FP32")   # greedy
    temp.set_data_from_numpy(np.array([0.0], dtype=np.float32))
    return ins + [s, m, temp]


def stream_text(client, model=MODEL, **kw) -> tuple[str, list]:
    """The classic tritonclient streaming program: start_stream + async_stream_infer + callback."""
    q: queue.Queue = queue.Queue()
    client.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), q))
    try:
        client.async_stream_infer(model, _inputs(**kw), request_id="r1", enable_empty_final_response=True)
        text, results = "", []
        while True:
            result, error = q.get(timeout=60)
            if error is not None:
                raise error
            results.append(result)
            out = result.as_numpy("text_output")
            if out is not None:
                text += b"".join(out.reshape(-1)).decode()
            if result.get_response().parameters["triton_final_response"].bool_param:
                return text, results
    finally:
        client.stop_stream()


def test_stream_equals_switchyard_generate(stack_b, tclient):
    text, results = stream_text(tclient, max_tokens=10)
    assert len(results) > 2, "decoupled: one response per engine step, then the empty final one"
    from services.client import stream_generate
    out = io.StringIO()
    assert stream_generate(stack_b.router, PROMPT, model=MODEL, max_tokens=10, temperature=0.0, out=out) == 0
    assert text == out.getvalue()[:-1] and text   # stream_generate ends with a newline
    # Unary ModelInfer gives the same greedy text in one response.
    r = tclient.infer(MODEL, _inputs(max_tokens=10, stream=False))
    assert r.as_numpy("text_output")[0].decode() == text


def test_ready_metadata_config_index(stack_b, tclient):
    assert tclient.is_server_live() and tclient.is_server_ready()
    assert tclient.is_model_ready(MODEL)
    assert not tclient.is_model_ready("no-such-model")
    meta = tclient.get_model_metadata(MODEL, as_json=True)
    assert {"name": "text_input", "datatype": "BYTES", "shape": ["1"]} in meta["inputs"]
    assert any(o["name"] == "text_output" and o["datatype"] == "BYTES" for o in meta["outputs"])
    cfg = tclient.get_model_config(MODEL, as_json=True)["config"]
    assert cfg["model_transaction_policy"]["decoupled"] is True
    idx = tclient.get_model_repository_index(as_json=True)["models"]
    assert {"name": MODEL, "version": "1", "state": "READY"} in idx


def _totals(stack) -> tuple[int, int]:
    """(prompt tokens, waiting + running) from a heartbeat sent after this call."""
    w = stack.worker_status_since(time.monotonic())
    return int(w["prompt_tokens_total"]), int(w["num_waiting"]) + int(w["num_running"])


def test_bad_inputs_are_triton_errors_and_nothing_is_queued(stack_b, tclient):
    from tritonclient.utils import InferenceServerException
    before = _totals(stack_b)
    with pytest.raises(InferenceServerException) as e:
        tclient.infer(MODEL, _inputs(text=None))
    assert "StatusCode.INVALID_ARGUMENT" in str(e.value.status()) and "text_input" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        tclient.infer(MODEL, _inputs(text_dtype="INT32"))
    assert "INVALID_ARGUMENT" in str(e.value.status())
    assert "'text_input' data-type is 'INT32'" in e.value.message() and "'BYTES'" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        tclient.infer("no-such-model", _inputs())
    assert "NOT_FOUND" in str(e.value.status()) and "unknown model: 'no-such-model'" in e.value.message()
    # On the stream the same errors come back as the stream's error_message.
    with pytest.raises(InferenceServerException, match="missing required input"):
        stream_text(tclient, text=None)
    with pytest.raises(InferenceServerException, match="unknown model"):
        stream_text(tclient, model="no-such-model")
    assert _totals(stack_b) == before, "a rejected request reached the batcher"


def test_unload_and_load_change_list_models(stack_b, tclient):
    import grpc

    from protos.switchyard.v1 import inference_pb2, inference_pb2_grpc

    def workers() -> int:
        with grpc.insecure_channel(stack_b.router) as ch:
            ms = inference_pb2_grpc.InferenceStub(ch).ListModels(inference_pb2.ListModelsRequest(), timeout=5)
        return next(m.num_workers for m in ms.models if m.name == MODEL)

    assert workers() == 1
    tclient.unload_model(MODEL)
    try:
        assert workers() == 0
        assert not tclient.is_model_ready(MODEL)
        idx = tclient.get_model_repository_index(as_json=True)["models"]
        assert any(m["name"] == MODEL and m["state"] == "UNAVAILABLE" for m in idx)
    finally:
        tclient.load_model(MODEL)
    assert workers() == 1 and tclient.is_model_ready(MODEL)
