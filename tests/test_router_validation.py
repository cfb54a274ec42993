import grpc
import pytest

from protos.switchyard.v1 import common_pb2, inference_pb2
from router.validation import RequestError, check_prompt_length, validate_generate

MODELS = ["smollm2-135m"]


def _req(**kw) -> inference_pb2.GenerateRequest:
    sampling = kw.pop("sampling", {})
    r = inference_pb2.GenerateRequest(model=kw.pop("model", "smollm2-135m"), prompt=kw.pop("prompt", "hi"), **kw)
    r.sampling.CopyFrom(common_pb2.SamplingParams(**sampling))
    return r


def _err(req) -> RequestError:
    with pytest.raises(RequestError) as ei:
        validate_generate(req, MODELS, "smollm2-135m")
    return ei.value


def test_valid_request_gets_defaults_and_an_id():
    v = validate_generate(_req(sampling={"max_tokens": 5, "temperature": 0.0}), MODELS, "smollm2-135m")
    assert v.sampling.max_tokens == 5 and v.sampling.greedy and len(v.request_id) == 32 and v.model == "smollm2-135m"


def test_unknown_model_is_not_found_and_lists_known():
    e = _err(_req(model="gpt-9"))
    assert e.code == grpc.StatusCode.NOT_FOUND and "gpt-9" in e.message and "smollm2-135m" in e.message


@pytest.mark.parametrize("req,field", [
    (_req(prompt=""), "prompt"),
    (_req(sampling={"max_tokens": 0}), "max_tokens"),
    (_req(sampling={"temperature": -0.5}), "temperature"),
    (_req(sampling={"top_p": 0.0}), "top_p"),
    (_req(sampling={"temperature": float("nan")}), "temperature"),
    (_req(priority=1000), "priority"),
    (_req(request_id="has.dot"), "request_id"),
])
def test_bad_fields_are_invalid_argument_naming_the_field(req, field):
    e = _err(req)
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.message.startswith(field + ":"), e.message


def test_prompt_and_messages_are_exclusive_and_roles_checked():
    r = _req()
    r.messages.add(role="user", content="x")
    assert _err(r).field == "prompt"
    r = _req(prompt="")
    r.messages.add(role="wizard", content="x")
    assert _err(r).field == "messages[0].role"


def test_prompt_over_the_context():
    check_prompt_length(511, 512)
    with pytest.raises(RequestError) as ei:
        check_prompt_length(512, 512)
    assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in ei.value.message
