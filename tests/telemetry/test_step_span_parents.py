"""Which span each worker.step hangs off (telemetry/request_spans.py), including the steps the batcher
plans before a request's first token has landed (step pipelining). No processes: an SDK tracer."""
from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

from telemetry import propagation, tracing
from telemetry.request_spans import BatcherSpans


@pytest.fixture
def spans(monkeypatch):
    from opentelemetry.sdk.trace import TracerProvider
    monkeypatch.setattr(tracing, "tracer", TracerProvider().get_tracer("test"))
    bs = BatcherSpans("w0")
    recv = tracing.tracer.start_span(tracing.BATCHER_RECEIVE)
    bs.admitted(recv, "a", "m", prompt_tokens=5)
    return bs, propagation.traceparent_of(recv)


def new(n_new: int, computed: int = 0) -> NS:
    return NS(new_requests=[NS(request_id="a", token_ids=[1, 2, 3, 4, 5], num_computed_tokens=computed,
                               num_new_tokens=n_new)], running=[])


def running(n_new: int) -> NS:
    return NS(new_requests=[], running=[NS(request_id="a", num_new_tokens=n_new)])


def first_token(bs: BatcherSpans) -> None:
    bs.output(NS(request_id="a", finished=False))


def test_a_decode_planned_before_the_first_token_hangs_off_receive(spans):
    bs, recv_tp = spans
    prefill_tp = bs.step_context(new(5))[0]
    assert prefill_tp not in ("", recv_tp)
    assert bs.step_context(running(1)) == (recv_tp, [recv_tp])      # planned ahead: prefill keeps one step
    first_token(bs)
    decode_tp = bs.reqs["a"].tp
    assert bs.step_context(running(1)) == (decode_tp, [decode_tp])


def test_chunked_prefill_chunks_stay_under_prefill(spans):
    bs, recv_tp = spans
    prefill_tp = bs.step_context(new(3))[0]
    assert bs.step_context(running(2)) == (prefill_tp, [prefill_tp])   # the last chunk: still prefill
    assert bs.step_context(running(1)) == (recv_tp, [recv_tp])         # then a decode planned ahead
