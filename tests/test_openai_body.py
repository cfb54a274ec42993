"""OpenAI bodies -> switchyard messages (router/openai_body.py), batch input lines (router/batch_jobs.py
parse_lines), result folding, and the HTTP front door's gRPC -> HTTP error mapping."""
from __future__ import annotations

import json

import grpc
import pytest

from common import subjects
from protos.switchyard.v1 import common_pb2
from router import openai_body
from router.batch_jobs import Progress, parse_lines, result_key
from router.openai_body import BodyError

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_chat_body_maps_sampling_and_messages():
    req, stream, usage = openai_body.parse_chat({**CHAT, "max_tokens": 7, "temperature": 0.5, "top_p": 0.9,
                                                 "seed": 42, "stop": "END", "stream": True,
                                                 "stream_options": {"include_usage": True},
                                                 "messages": [{"role": "developer", "content": "be brief"},
                                                              {"role": "user", "content": [{"type": "text",
                                                                                            "text": "a"},
                                                                                           {"type": "text",
                                                                                            "text": "b"}]}]})
    assert (stream, usage) == (True, True)
    s = req.sampling
    assert (s.max_tokens, round(s.temperature, 3), round(s.top_p, 3), s.seed) == (7, 0.5, 0.9, 42)
    assert list(s.stop) == ["END"]
    assert [(m.role, m.content) for m in req.messages] == [("system", "be brief"), ("user", "ab")]


def test_completion_defaults_to_16_tokens_and_takes_a_one_prompt_list():
    req, stream, _ = openai_body.parse_completion({"model": "m", "prompt": ["once"]})
    assert req.prompt == "once" and req.sampling.max_tokens == 16 and not stream


@pytest.mark.parametrize("body, param", [
    ({**CHAT, "frobnicate": 1}, "frobnicate"),                    # OpenAI: Unrecognized request argument
    ({**CHAT, "n": 2}, "n"),
    ({**CHAT, "temperature": 3}, "temperature"),
    ({**CHAT, "max_tokens": 0}, "max_tokens"),
    ({**CHAT, "max_tokens": "5"}, "max_tokens"),
    ({**CHAT, "stop": [""]}, "stop"),
    ({**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),   # only with stream
    ({**CHAT, "tools": [{"type": "function"}]}, "tools"),
    ({**CHAT, "messages": []}, "messages"),
    ({**CHAT, "messages": [{"role": "user", "content": "x", "extra": 1}]}, "messages[0]"),
])
def test_chat_refusals_name_the_parameter(body, param):
    with pytest.raises(BodyError) as e:
        openai_body.parse_chat(body)
    assert e.value.param == param


def test_embeddings_body():
    req, fmt = openai_body.parse_embeddings({"model": "e", "input": ["a", "b"], "encoding_format": "base64"})
    assert list(req.texts) == ["a", "b"] and fmt == "base64"
    with pytest.raises(BodyError, match="input"):
        openai_body.parse_embeddings({"model": "e", "input": [1, 2]})


def test_responses_have_openai_shapes():
    u = common_pb2.Usage(prompt_tokens=3, completion_tokens=2, cached_tokens=1)
    full = openai_body.full_response(openai_body.CHAT, "r1", "m", "hey", common_pb2.FINISH_REASON_LENGTH, u, 5)
    assert full["choices"][0]["message"] == {"role": "assistant", "content": "hey"}
    assert full["choices"][0]["finish_reason"] == "length" and full["usage"]["total_tokens"] == 5
    first = openai_body.stream_chunk(openai_body.CHAT, "r1", "m", 5, "a", first=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "a"}
    assert openai_body.usage_chunk(openai_body.COMPLETIONS, "r1", "m", 5, u)["choices"] == []
    spec = common_pb2.Usage(prompt_tokens=3, completion_tokens=9, spec_proposed_tokens=8, spec_accepted_tokens=6)
    assert openai_body.usage_dict(spec)["completion_tokens_details"] == {"accepted_prediction_tokens": 6,
                                                                         "rejected_prediction_tokens": 2}


def line(cid, **body):
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                       "body": {**CHAT, "model": "m", **body}}).encode()


def test_batch_lines_are_checked_one_by_one():
    data = b"\n".join([line("a"), b"{bad", line("b", model="other"), line("a"), b"\xff", b"",
                       json.dumps({"custom_id": "c", "body": CHAT, "extra": 1}).encode(), line("d", stream=True)])
    items, errors = parse_lines(data, openai_body.CHAT, "m", {"m"}, max_items=10)
    assert [i["custom_id"] for i in items] == ["a"]
    assert [(e["line"], e["code"]) for e in errors] == [
        (2, "invalid_json"), (3, "model_not_found"), (4, "duplicate_custom_id"), (5, "invalid_encoding"),
        (7, "invalid_request"), (8, "invalid_request")]
    assert errors[4]["param"] == "extra" and errors[5]["param"] == "body.stream"


def test_progress_counts_each_item_once():
    p = Progress()
    rec = {"x_switchyard": {"state": "completed", "completion_tokens": 2, "cost_usd": 0.5}}
    assert p.add("k1", rec) and not p.add("k1", rec)   # a result stored twice (redelivery) counts once
    p.add("k2", {"x_switchyard": {"state": "dead_letter"}})
    assert p.done == 2 and p.counts["completed"] == 1 and p.counts["dead_letter"] == 1 and p.completion_tokens == 2


def test_result_subjects_take_any_custom_id():
    key = result_key("weird id.with *dots* > and spaces")
    assert subjects.batch_result("batch_1", key).startswith("sy.batch.result.batch_1.")
    assert subjects.batch_item("batch_1") == "sy.batch.item.batch_1"
    with pytest.raises(ValueError):
        subjects.batch_item("a.b")


def test_grpc_errors_map_to_http_status_and_retry_after():
    pytest.importorskip("fastapi")
    from services.openai_http import from_grpc

    def err(code, details, trailers=()):
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), details)
    r = from_grpc(err(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", [("retry-after-ms", "1500")]))
    assert r.status_code == 429 and r.headers["retry-after"] == "2" and r.headers["retry-after-ms"] == "1500"
    body = json.loads(r.body)["error"]
    assert body["type"] == "rate_limit_error" and body["message"] == "queue full"
    assert from_grpc(err(grpc.StatusCode.UNAUTHENTICATED, "no token")).status_code == 401
    assert from_grpc(err(grpc.StatusCode.NOT_FOUND, "model 'x' is not served")).status_code == 404
    assert from_grpc(err(grpc.StatusCode.UNAVAILABLE, "no worker")).status_code == 503
    assert from_grpc(err(grpc.StatusCode.INVALID_ARGUMENT, "bad")).status_code == 400
