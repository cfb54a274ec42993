"""Fuzzing the Triton front door (services/triton_front.py): every RPC of `inference.GRPCInferenceService`
gets generated messages - inference requests built from the front door's own inputs (right and wrong
datatypes, text that is not UTF-8, JSON that is not an object, unknown inputs and outputs), repository
and metadata requests, the shared-memory, trace and log RPCs it does not implement - plus mutated and
garbage bytes, on the unary calls and on the ModelStreamInfer stream.

Property, per message: the call ends within the timeout, never UNKNOWN or INTERNAL, with a one-line
message; on the stream every request gets its answer (a response or an error_message) and the stream
ends cleanly; no process of the stack dies. Valid inferences ask for at most 2 tokens.
"""
from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from tests.e2e.conftest import pid_alive
from tests.fuzz.wire import TIMEOUT_S, call, check_answer, fuzz_settings, messages, statuses, wire

MODEL = "smollm2-135m"
SERVICE = "/inference.GRPCInferenceService/"


def _triton():
    from workers.backends.tritongrpc import load
    _tg, _aio, pb, pb_grpc, mc, tutils = load()
    return pb, tutils


def _mostly(valid: list, wild: st.SearchStrategy) -> st.SearchStrategy:
    """A valid value about four times out of five, else a wild one (st.one_of would favour the wild one)."""
    return st.integers(0, 4).flatmap(lambda i: st.sampled_from(valid) if i else wild)


def _name():
    return _mostly([MODEL], st.one_of(st.sampled_from(["", "nope", MODEL + " "]), st.text(max_size=12)))


_DTYPES = ["BYTES", "BOOL", "INT32", "UINT64", "FP32", "INT64", "FP16", "UINT8", "", "NOPE"]
_JSON = ['{}', '{"temperature": 0}', '{"max_tokens": 1}', "not json", "[1, 2]", '{"top_k": "x"}',
         '{"stop": ["."]}', '{"seed": -1}', '{"temperature": "hot"}', '{"stop_token_ids": [-5]}']


@st.composite
def _tensor(draw, name: str | None = None):
    """(InferInputTensor, raw bytes or None): mostly the declared datatype and a well-formed value."""
    pb, tutils = _triton()
    from services.triton_front import INPUTS
    name = name or draw(_mostly(sorted(INPUTS), st.text(max_size=10)))
    declared = INPUTS.get(name, ("BYTES",))[0]
    dtype = draw(_mostly([declared], st.sampled_from(_DTYPES)))
    shape = draw(_mostly([[1]], st.lists(st.integers(-2, 3), max_size=3)))
    t = pb.ModelInferRequest.InferInputTensor(name=name, datatype=dtype, shape=shape)
    if dtype == "BYTES":
        if name == "sampling_parameters":
            vals = [draw(st.sampled_from(_JSON)).encode()]
        else:
            vals = [draw(_mostly([b"Hello", b"The sky is"],
                                 st.one_of(st.binary(max_size=16), st.text(max_size=16).map(str.encode))))]
    elif dtype == "BOOL":
        vals = [draw(st.booleans())]
    elif name == "max_tokens" or dtype not in ("INT32", "INT64", "UINT64", "FP32"):
        vals = [draw(st.sampled_from([1, 2, 0, -1]))]   # valid inferences: at most 2 tokens
    else:
        vals = [draw(st.one_of(st.integers(-3, 3), st.floats(width=32) if dtype == "FP32" else st.integers(0, 9)))]
    if draw(st.integers(0, 3)) == 0:   # raw_input_contents instead of typed contents
        raw = draw(st.one_of(st.binary(max_size=12), st.just(b"")))
        if dtype == "BYTES" and draw(st.booleans()):
            raw = tutils.serialize_byte_tensor(np.array(vals, dtype=np.object_)).item()
        return t, raw
    c = t.contents
    try:
        if dtype == "BYTES":
            c.bytes_contents.extend(vals)
        elif dtype == "BOOL":
            c.bool_contents.extend(vals)
        elif dtype == "FP32":
            c.fp32_contents.extend([float(v) for v in vals])
        elif dtype == "UINT64":
            c.uint64_contents.extend([abs(int(v)) for v in vals])
        elif dtype == "INT64":
            c.int64_contents.extend([int(v) for v in vals])
        else:
            c.int_contents.extend([int(v) for v in vals])
    except (TypeError, ValueError):
        pass
    return t, None


@st.composite
def infer_requests(draw):
    """A ModelInferRequest: text_input and max_tokens (<= 2) most of the time, a few other inputs,
    some outputs and parameters; each part sometimes wrong."""
    pb, _ = _triton()
    req = pb.ModelInferRequest(model_name=draw(_name()), id=draw(_mostly(["", "req-1"], st.text(max_size=10))),
                               model_version=draw(_mostly([""], st.sampled_from(["1", "2", "x"]))))
    names = ["text_input"] if draw(st.integers(0, 5)) else []
    names.append("max_tokens")   # always: no valid inference runs long
    names += draw(st.lists(st.sampled_from(["stream", "temperature", "top_k", "seed", "sampling_parameters",
                                            "return_finish_reason", "exclude_input_in_output", "bogus"]),
                           max_size=2, unique=True))
    raws = []
    for n in names:
        t, raw = draw(_tensor(n))
        req.inputs.append(t)
        raws.append(raw)
    if all(r is not None for r in raws) or (draw(st.integers(0, 4)) == 0 and any(r is not None for r in raws)):
        req.raw_input_contents.extend([r if r is not None else b"" for r in raws])
    for o in draw(st.lists(st.sampled_from(["text_output", "finish_reason", "num_output_tokens", "nope"]),
                           max_size=2, unique=True)):
        req.outputs.add(name=o)
    for k, v in draw(st.dictionaries(st.sampled_from(["priority", "triton_enable_empty_final_response", "stop",
                                                      "temperature", "max_tokens", "x"]),
                                     st.one_of(st.integers(0, 2), st.booleans(), st.text(max_size=6)),
                                     max_size=2)).items():
        p = req.parameters[k]
        if isinstance(v, bool):
            p.bool_param = v
        elif isinstance(v, int):
            if k == "priority":
                p.uint64_param = v
            else:
                p.int64_param = v
        else:
            p.string_param = v
    return req


def _valid_infer(stream: bool = False):
    pb, _ = _triton()
    req = pb.ModelInferRequest(model_name=MODEL, id="ok")
    req.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"Hello")
    req.inputs.add(name="max_tokens", datatype="INT32", shape=[1]).contents.int_contents.append(2)
    if stream:
        req.inputs.add(name="stream", datatype="BOOL", shape=[1]).contents.bool_contents.append(True)
    return req


def _unary_rpcs():
    pb, _ = _triton()
    d = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    named = dict(name=_name(), model_name=_name(), version=_mostly([""], st.sampled_from(["1", "2", "x"])))
    out = []
    for m in d.methods:
        if m.client_streaming:
            continue
        hints = {k: v for k, v in named.items() if k in m.input_type.fields_by_name}
        if m.name == "RepositoryModelUnload":   # never the served model: the other tests need it
            hints["model_name"] = st.sampled_from(["nope", "", "other-model"])
        out.append((m.name, m.input_type, hints))
    return out


UNARY = _unary_rpcs()


@pytest.mark.parametrize("method,desc,hints", UNARY, ids=[u[0] for u in UNARY])
def test_triton_unary_rpc_answers_every_generated_message(fuzz_stack, method, desc, hints):
    from common.rpc import options
    seen = statuses(SERVICE + method)
    msgs = infer_requests() if method == "ModelInfer" else messages(desc, hints)
    addr = fuzz_stack.state["triton"]
    with grpc.insecure_channel(addr, options=options()) as ch:
        @fuzz_settings()
        @given(data=wire(msgs))
        @example(data=b"\xff\xff\xff\xff garbage")
        @example(data=b"\x0a\x02\xc3\x28")       # field 1 (a name), a string that is not UTF-8
        def answers(data):
            check_answer(call(ch, SERVICE + method, data), data, seen)
        answers()
        garbage = call(ch, SERVICE + method, b"\xff\xff\xff\xff garbage")
        assert garbage.code == grpc.StatusCode.INVALID_ARGUMENT and "could not be decoded" in garbage.details, garbage
        if method == "ModelInfer":
            ok = call(ch, SERVICE + method, _valid_infer().SerializeToString())
            assert ok.code == grpc.StatusCode.OK, ok
    print(method, "statuses:", seen)
    dead = [p for p in fuzz_stack.all_pids() if not pid_alive(p)]
    assert not dead, f"stack processes died: {dead}\n{fuzz_stack.logs()}"


def _stream_answers(ch, payloads: list[bytes]) -> tuple[grpc.StatusCode, str, list]:
    """Send the requests on one ModelStreamInfer stream; (status, details, responses)."""
    pb, _ = _triton()
    ident = lambda b: b   # noqa: E731
    out = []
    try:
        for r in ch.stream_stream(SERVICE + "ModelStreamInfer", request_serializer=ident,
                                  response_deserializer=ident)(iter(payloads), timeout=TIMEOUT_S):
            out.append(pb.ModelStreamInferResponse.FromString(r))
        return grpc.StatusCode.OK, "", out
    except grpc.RpcError as e:
        return e.code(), e.details() or "", out


def test_triton_stream_answers_every_request_on_it(fuzz_stack):
    """Up to three generated requests (or garbage) per stream: each gets a final response or an
    error_message, and the stream itself ends OK."""
    from common.rpc import options
    seen = statuses(SERVICE + "ModelStreamInfer (streams of 1-3 requests)")
    valid = _valid_infer(stream=True).SerializeToString()
    with grpc.insecure_channel(fuzz_stack.state["triton"], options=options()) as ch:
        @fuzz_settings()
        @given(payloads=st.lists(wire(infer_requests()), min_size=1, max_size=3))
        @example(payloads=[b"\xff\xff\xff\xff garbage", valid])
        @example(payloads=[valid])
        def answers(payloads):
            code, details, resps = _stream_answers(ch, payloads)
            seen[code.name] = seen.get(code.name, 0) + 1
            assert code == grpc.StatusCode.OK, (code, details, payloads)
            errors = [r for r in resps if r.error_message]
            finals = [r for r in resps if not r.error_message
                      and r.infer_response.parameters["triton_final_response"].bool_param]
            assert len(errors) + len(finals) == len(payloads), (resps, payloads)
            assert all("\n" not in r.error_message and "internal error" not in r.error_message for r in errors), errors
        answers()
        code, _, resps = _stream_answers(ch, [b"\xff\xff garbage"])
        assert code == grpc.StatusCode.OK and len(resps) == 1, (code, resps)
        assert "could not be decoded" in resps[0].error_message, resps
    print("ModelStreamInfer streams:", seen)
    dead = [p for p in fuzz_stack.all_pids() if not pid_alive(p)]
    assert not dead, f"stack processes died: {dead}\n{fuzz_stack.logs()}"


@pytest.mark.parametrize("raw", [[b"\x01", b"\x02\x00\x00\x00"],               # BYTES: a length prefix cut short
                                 [b"\x05\x00\x00\x00Hello", b"\x02\x00\x00"]])   # INT32: 3 bytes
def test_triton_raw_contents_that_are_no_tensor_are_invalid_argument(fuzz_stack, raw):
    """Found by the fuzzing: raw_input_contents that do not parse as their datatype were UNKNOWN
    (struct.error / ValueError escaped the handler); on the stream they are an error_message."""
    from common.rpc import options
    req = _valid_infer()
    for t in req.inputs:
        t.ClearField("contents")
    req.raw_input_contents.extend(raw)
    with grpc.insecure_channel(fuzz_stack.state["triton"], options=options()) as ch:
        a = call(ch, SERVICE + "ModelInfer", req.SerializeToString())
        code, _, resps = _stream_answers(ch, [req.SerializeToString()])
    assert a.code == grpc.StatusCode.INVALID_ARGUMENT and "raw contents" in a.details, a
    assert code == grpc.StatusCode.OK and len(resps) == 1 and "raw contents" in resps[0].error_message, resps
