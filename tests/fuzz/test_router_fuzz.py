"""Fuzzing the router's front door: every RPC of `switchyard.v1.Inference` and `Admin` gets generated
messages (mostly valid, each field sometimes wild, some mutated on the wire, some raw garbage).

Property, per message: the call ends within the timeout with a status a client can act on - never
UNKNOWN or INTERNAL - and a one-line message; afterwards every process of the stack is still the one
that started (nothing crashed or was restarted). Valid Generates ask for at most 2 tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import grpc
import pytest
from hypothesis import example, given, strategies as st

from tests.e2e.conftest import pid_alive
from tests.fuzz.conftest import ADMIN_TOKEN
from tests.fuzz.wire import call, check_answer, fuzz_settings, messages, statuses, wire

MODEL = "smollm2-135m"


def _pb():
    from protos.switchyard.v1 import common_pb2, inference_pb2, kv_index_pb2
    return common_pb2, inference_pb2, kv_index_pb2


def _mostly(valid: list, wild: st.SearchStrategy) -> st.SearchStrategy:
    """A valid value about four times out of five, else a wild one (st.one_of would favour the wild one)."""
    return st.integers(0, 4).flatmap(lambda i: st.sampled_from(valid) if i else wild)


def _model():
    wild = st.one_of(st.sampled_from(["", "nope", MODEL + "\x00", MODEL.upper()]), st.text(max_size=12))
    return _mostly([MODEL], wild)


def _small_max_tokens(m, draw) -> None:
    """Valid Generates stop after at most 2 tokens (no stuck request, a quick run)."""
    sampling = m.sampling if hasattr(m, "sampling") else m
    sampling.max_tokens = draw(st.sampled_from([1, 2, 2, 0, -1]))


@dataclass
class Rpc:
    path: str
    request: str                       # message name in inference_pb2 / kv_index_pb2
    kind: str = "unary"
    hints: dict = field(default_factory=dict)
    fixup: object = None
    valid: dict = field(default_factory=dict)    # an explicit valid example's fields
    served: bool = False                         # the valid example must be answered OK
    admin: bool = False                          # needs the admin token (sent with most messages)

    def descriptor(self):
        _, inference_pb2, kv_index_pb2 = _pb()
        mod = kv_index_pb2 if hasattr(kv_index_pb2, self.request) else inference_pb2
        return getattr(mod, self.request).DESCRIPTOR

    def valid_bytes(self) -> bytes:
        from google.protobuf import message_factory
        msg = message_factory.GetMessageClass(self.descriptor())(**self.valid)
        if self.fixup is not None:
            msg.sampling.max_tokens = 2
        return msg.SerializeToString()


def _rpcs() -> list[Rpc]:
    common_pb2, inference_pb2, _ = _pb()
    sampling = st.one_of(*[st.just(common_pb2.SamplingParams(temperature=0.0))] * 2,
                         messages(common_pb2.SamplingParams.DESCRIPTOR))
    chat = messages(inference_pb2.ChatMessage.DESCRIPTOR)
    prompt = _mostly(["Hello", "The capital of France is", "def f(x):"], st.text(max_size=40))
    return [
        Rpc("/switchyard.v1.Inference/Generate", "GenerateRequest", "server_stream",
            hints=dict(model=_model(), prompt=prompt, sampling=sampling, intent=_mostly([""], st.text(max_size=8)),
                       capabilities=_mostly([[]], st.lists(st.text(max_size=8), max_size=2)),
                       messages=_mostly([[]], st.lists(chat, max_size=2)),
                       request_id=_mostly([""], st.text(max_size=70)), adapter_id=_mostly([""], st.text(max_size=8)),
                       priority=_mostly([0], st.integers(-300, 300)),
                       service_class=_mostly([""], st.sampled_from(["interactive", "batch", "x"]))),
            fixup=_small_max_tokens, valid=dict(model=MODEL, prompt="Hello"), served=True),
        Rpc("/switchyard.v1.Inference/Tokenize", "TokenizeRequest", hints=dict(model=_model(), prompt=prompt),
            valid=dict(model=MODEL, prompt="Hello"), served=True),
        Rpc("/switchyard.v1.Inference/ListModels", "ListModelsRequest", served=True),
        Rpc("/switchyard.v1.Inference/ListAdapters", "ListAdaptersRequest", hints=dict(base_model=_model()),
            valid=dict(base_model=MODEL), served=True),
        Rpc("/switchyard.v1.Admin/Status", "StatusRequest", served=True),
        # No model pool in this stack: FAILED_PRECONDITION naming `--pool`, whatever the fields.
        Rpc("/switchyard.v1.Admin/LoadModel", "LoadModelRequest", admin=True, hints=dict(name=_model()),
            valid=dict(name=MODEL)),
        Rpc("/switchyard.v1.Admin/UnloadModel", "UnloadModelRequest", admin=True,
            hints=dict(name=st.sampled_from(["nope", "", "other-model"])), valid=dict(name="nope")),
        Rpc("/switchyard.v1.Admin/LoadAdapter", "LoadAdapterRequest", admin=True,
            hints=dict(name=_mostly(["fz-adapter"], st.text(max_size=70)), base_model=_model(),
                       path=_mostly(["/nonexistent/adapter", "", "/tmp", "."], st.text(max_size=30))),
            valid=dict(name="fz-adapter", path="/nonexistent/adapter")),
        Rpc("/switchyard.v1.Admin/UnloadAdapter", "UnloadAdapterRequest", admin=True,
            hints=dict(name=_mostly(["fz-adapter", "missing"], st.text(max_size=70)),
                       drain_timeout_s=_mostly([0.0, 0.5], st.floats())),
            valid=dict(name="missing")),
    ]


RPCS = _rpcs()


@pytest.mark.parametrize("rpc", RPCS, ids=[r.path.rsplit("/", 1)[1] for r in RPCS])
def test_router_rpc_answers_every_generated_message(fuzz_stack, rpc):
    from common.rpc import options
    seen = statuses(rpc.path)
    valid = rpc.valid_bytes()
    with grpc.insecure_channel(fuzz_stack.router, options=options()) as ch:
        @fuzz_settings()
        @given(data=wire(messages(rpc.descriptor(), rpc.hints), rpc.fixup),
               token=st.sampled_from([ADMIN_TOKEN] * 4 + ["", "wrong"]) if rpc.admin else st.just(""))
        @example(data=valid, token=ADMIN_TOKEN)
        @example(data=b"\xff\xff\xff\xff garbage", token=ADMIN_TOKEN)
        @example(data=b"\x0a\x02\xc3\x28", token=ADMIN_TOKEN)        # field 1, a string that is not UTF-8
        def answers(data, token):
            md = (("authorization", f"Bearer {token}"),) if token else ()
            check_answer(call(ch, rpc.path, data, rpc.kind, metadata=md), data, seen)
        answers()
        # garbage is refused with INVALID_ARGUMENT saying why; the valid example is served
        garbage = call(ch, rpc.path, b"\xff\xff\xff\xff garbage", rpc.kind)
        assert garbage.code == grpc.StatusCode.INVALID_ARGUMENT and "could not be decoded" in garbage.details, garbage
        if rpc.served:
            ok = call(ch, rpc.path, valid, rpc.kind, metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),))
            assert ok.code == grpc.StatusCode.OK and ok.responses >= 1, ok
    print(rpc.path, "statuses:", seen)
    dead = [p for p in fuzz_stack.all_pids() if not pid_alive(p)]
    assert not dead, f"stack processes died: {dead}\n{fuzz_stack.logs()}"
