"""Generated requests for any RPC, and the property every front door must keep.

`messages(desc, hints)` draws protobuf messages from a descriptor: every field sometimes set, to any
value of its type (NaN and infinite floats, out-of-range enums, odd text), nested messages and maps
included; `hints` replace a field's strategy with one that is mostly valid (a served model name), so
a good share of the requests is served. `wire(...)` turns them into the bytes sent: the message as
is, with a byte flipped, truncated, with bytes spliced in, or raw garbage.

`call(...)` sends raw bytes over a generic channel method (identity serializers: the server does all
the decoding) and returns how the call ended; `check_answer` is the property: a status a client can act
on (never UNKNOWN or INTERNAL), a one-line message, and an end within the timeout (no stuck request).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor as F
from hypothesis import HealthCheck, settings, strategies as st

from tests.fuzz.conftest import EXAMPLES

TIMEOUT_S = 30.0           # every call must end well within this (valid Generates ask for <= 2 tokens)
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED}


def fuzz_settings():
    """Seeded (derandomized) and with no example database: the same messages on every run."""
    return settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


_INT_RANGES = {F.TYPE_INT32: (-2**31, 2**31 - 1), F.TYPE_SINT32: (-2**31, 2**31 - 1),
               F.TYPE_SFIXED32: (-2**31, 2**31 - 1), F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_FIXED32: (0, 2**32 - 1),
               F.TYPE_INT64: (-2**63, 2**63 - 1), F.TYPE_SINT64: (-2**63, 2**63 - 1),
               F.TYPE_SFIXED64: (-2**63, 2**63 - 1), F.TYPE_UINT64: (0, 2**64 - 1), F.TYPE_FIXED64: (0, 2**64 - 1)}


def _scalar(f) -> st.SearchStrategy:
    if f.type == F.TYPE_STRING:
        return st.one_of(st.text(max_size=24), st.sampled_from(["", " ", "\x00", "a" * 300, "../..", "é💥"]))
    if f.type == F.TYPE_BYTES:
        return st.binary(max_size=24)
    if f.type == F.TYPE_BOOL:
        return st.booleans()
    if f.type in _INT_RANGES:
        lo, hi = _INT_RANGES[f.type]
        return st.one_of(st.integers(-3, 3).filter(lambda v: lo <= v <= hi), st.integers(lo, hi), st.just(hi))
    if f.type == F.TYPE_FLOAT:
        return st.floats(width=32)
    if f.type == F.TYPE_DOUBLE:
        return st.floats()
    if f.type == F.TYPE_ENUM:
        top = max(v.number for v in f.enum_type.values)
        return st.integers(-1, top + 2)
    raise TypeError(f"no strategy for field {f.full_name} of type {f.type}")


def messages(desc, hints: dict | None = None, depth: int = 0) -> st.SearchStrategy:
    """Messages of type `desc`. hints: field name -> strategy of its value (a list for a repeated
    field); a hinted field is always set."""
    hints = hints or {}
    cls = message_factory.GetMessageClass(desc)

    @st.composite
    def build(draw):
        m = cls()
        for f in desc.fields:
            if f.name in hints:
                _set(m, f, draw(hints[f.name]))
                continue
            if draw(st.integers(0, 2)) != 0:   # a third of the fields set
                continue
            if f.message_type is not None and f.message_type.GetOptions().map_entry:
                if depth < 2:
                    key_f, val_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
                    for _ in range(draw(st.integers(0, 3))):
                        k = draw(_scalar(key_f))
                        if val_f.message_type is not None:
                            getattr(m, f.name)[k].CopyFrom(draw(messages(val_f.message_type, depth=depth + 1)))
                        else:
                            getattr(m, f.name)[k] = draw(_scalar(val_f))
                continue
            if f.message_type is not None:
                if depth >= 2:
                    continue
                sub = messages(f.message_type, depth=depth + 1)
                _set(m, f, draw(st.lists(sub, max_size=3)) if f.is_repeated else draw(sub))
                continue
            _set(m, f, draw(st.lists(_scalar(f), max_size=4)) if f.is_repeated else draw(_scalar(f)))
        return m
    return build()


def _set(m, f, value) -> None:
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        for k, v in dict(value).items():
            getattr(m, f.name)[k].CopyFrom(v) if hasattr(v, "CopyFrom") else getattr(m, f.name).__setitem__(k, v)
    elif f.is_repeated:
        field = getattr(m, f.name)
        for v in value:
            field.add().CopyFrom(v) if f.message_type is not None else field.append(v)
    elif f.message_type is not None:
        getattr(m, f.name).CopyFrom(value)
    else:
        setattr(m, f.name, value)


def wire(msgs: st.SearchStrategy, fixup=None) -> st.SearchStrategy:
    """Bytes to send: a generated message (after fixup(msg), e.g. max_tokens <= 2), mostly as is,
    sometimes flipped, truncated or spliced; and raw garbage."""
    @st.composite
    def mutated(draw):
        m = draw(msgs)
        if fixup is not None:
            fixup(m, draw)
        data = m.SerializeToString()
        how = draw(st.integers(0, 7))
        if how == 1 and data:
            i = draw(st.integers(0, len(data) - 1))
            data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
        elif how == 2:
            data = data[:draw(st.integers(0, len(data)))]
        elif how == 3:
            i = draw(st.integers(0, len(data)))
            data = data[:i] + draw(st.binary(min_size=1, max_size=8)) + data[i:]
        return data
    return st.one_of(mutated(), mutated(), mutated(), st.binary(max_size=300))


@dataclass
class Answer:
    code: grpc.StatusCode
    details: str
    seconds: float
    responses: int


def call(ch: grpc.Channel, method: str, data, kind: str = "unary", timeout: float = TIMEOUT_S,
         metadata: tuple = ()) -> Answer:
    """Send raw bytes to /package.Service/Method. kind: unary | server_stream | bidi (data: a list)."""
    ident = lambda b: b   # noqa: E731
    t0 = time.monotonic()
    n = 0
    try:
        kw = dict(request_serializer=ident, response_deserializer=ident)
        if kind == "unary":
            ch.unary_unary(method, **kw)(data, timeout=timeout, metadata=metadata)
            n = 1
        elif kind == "server_stream":
            for _ in ch.unary_stream(method, **kw)(data, timeout=timeout, metadata=metadata):
                n += 1
        else:
            for _ in ch.stream_stream(method, **kw)(iter(data), timeout=timeout, metadata=metadata):
                n += 1
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
    return Answer(code, details, time.monotonic() - t0, n)


# name -> {"test": pytest node id, "statuses": {code: count}}: written by conftest's
# pytest_sessionfinish to $SWITCHYARD_FUZZ_REPORT (the examples per RPC and what each got).
REPORT: dict[str, dict] = {}


def statuses(name: str) -> dict[str, int]:
    """The status counts of one RPC's fuzzing, kept for the session's report."""
    node = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
    REPORT[name] = {"test": node, "statuses": {}}
    return REPORT[name]["statuses"]


def check_answer(a: Answer, data, seen: dict) -> None:
    """The property: a status a client can act on, a one-line message, within the timeout."""
    seen[a.code.name] = seen.get(a.code.name, 0) + 1
    assert a.code not in FORBIDDEN, f"{a.code.name}: {a.details!r} after {a.seconds:.1f}s for {data!r:.300}"
    assert "\n" not in a.details and "debug_error_string" not in a.details, a.details
    assert a.seconds < TIMEOUT_S, f"the call took {a.seconds:.1f}s"
