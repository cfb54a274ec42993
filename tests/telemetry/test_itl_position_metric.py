"""The batcher's ITL-by-position histogram (telemetry/metrics.py BatcherMetrics.tokens_emitted), driven
directly with hand-made emission times: each gap lands under the right position_bucket label."""
from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from telemetry import metrics as M


def _metrics():
    reg = CollectorRegistry()
    return M.BatcherMetrics("m", "w0", 1.0, registry=reg), reg


def _count(reg, bucket):
    return reg.get_sample_value(f"{M.ITL_BY_POSITION}_count",
                                {"model": "m", "worker": "w0", "position_bucket": bucket}) or 0.0


def _sum(reg, bucket):
    return reg.get_sample_value(f"{M.ITL_BY_POSITION}_sum",
                                {"model": "m", "worker": "w0", "position_bucket": bucket}) or 0.0


def test_name_lives_in_the_one_list():
    assert M.ITL_BY_POSITION in M.ALL_NAMES and M.ITL_BY_POSITION.startswith("switchyard_")


def test_one_token_per_step_fills_position_buckets():
    m, reg = _metrics()
    # token 1 at t=10.0 (TTFT: nothing observed); tokens 2..12 every 0.01 s, then token 13 after 0.5 s
    m.tokens_emitted("a", 1, 1, 10.0)
    t = 10.0
    for k in range(2, 13):
        t += 0.01
        m.tokens_emitted("a", k, 1, t)
    m.tokens_emitted("a", 13, 1, t + 0.5, finished=True)
    assert _count(reg, "1") == 0
    assert _count(reg, "2-10") == 9 and _sum(reg, "2-10") == pytest.approx(0.09)
    assert _count(reg, "11-50") == 3 and _sum(reg, "11-50") == pytest.approx(0.02 + 0.5)
    # the 0.5 s gap is in the 11-50 histogram's 0.5 bucket but not under 0.4
    le = lambda b: reg.get_sample_value(f"{M.ITL_BY_POSITION}_bucket",  # noqa: E731
                                        {"model": "m", "worker": "w0", "position_bucket": "11-50", "le": b})
    assert le("0.4") == 2 and le("0.5") == 3
    assert "a" not in m._last_emit   # finished: its state is gone


def test_multi_token_chunks_split_the_gap_and_cross_buckets():
    m, reg = _metrics()
    m.tokens_emitted("b", 2, 2, 5.0)            # first chunk of 2 tokens: position 2 gets 0
    m.tokens_emitted("b", 9, 7, 5.7)            # positions 3..9, 0.1 s each
    m.tokens_emitted("b", 12, 3, 6.0)           # positions 10, 11, 12, 0.1 s each
    assert _count(reg, "2-10") == 1 + 7 + 1
    assert _sum(reg, "2-10") == pytest.approx(0.0 + 0.7 + 0.1)
    assert _count(reg, "11-50") == 2 and _sum(reg, "11-50") == pytest.approx(0.2)


def test_requests_are_tracked_apart_and_aborts_forgotten():
    m, reg = _metrics()
    m.tokens_emitted("x", 1, 1, 1.0)
    m.tokens_emitted("y", 1, 1, 1.5)
    m.tokens_emitted("x", 2, 1, 2.0)            # x: 1.0 s gap
    m.tokens_emitted("y", 2, 1, 2.0)            # y: 0.5 s gap
    assert _count(reg, "2-10") == 2 and _sum(reg, "2-10") == pytest.approx(1.5)
    m.forget("x")
    assert "x" not in m._last_emit
    # a request seen mid-stream with no earlier chunk (state reset): its gap is unknown, not observed
    m.reset_totals()
    m.tokens_emitted("y", 3, 1, 9.0)
    assert _count(reg, "2-10") == 2
    m.tokens_emitted("y", 4, 1, 9.25)
    assert _count(reg, "2-10") == 3 and _sum(reg, "2-10") == pytest.approx(1.75)
