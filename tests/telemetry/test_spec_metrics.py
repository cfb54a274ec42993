"""The batcher's speculative-decoding metrics (telemetry/metrics.py BatcherMetrics.spec_totals and
request_tokens_per_step), driven directly: the engine's cumulative per-method counters become
Prometheus counters by difference, a rebuilt core counts from zero, tokens per step per request."""
from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from batcher.spec_policy import SpecCounters
from telemetry import metrics as M


def _metrics():
    reg = CollectorRegistry()
    return M.BatcherMetrics("m", "w0", 1.0, registry=reg), reg


def _value(reg, name: str, method: str) -> float:
    return reg.get_sample_value(f"{name}_total", {"model": "m", "worker": "w0", "method": method}) or 0.0


def test_names_live_in_the_one_list():
    for name in (M.SPEC_PROPOSED, M.SPEC_ACCEPTED, M.SPEC_VERIFY_ROWS, M.SPEC_EMITTED, M.TOKENS_PER_STEP):
        assert name in M.ALL_NAMES and name.startswith("switchyard_")


def test_cumulative_totals_export_by_difference_per_method():
    m, reg = _metrics()
    m.spec_totals({"prompt_lookup": SpecCounters(proposed=8, accepted=6, verify_rows=2, emitted=8)})
    m.spec_totals({"prompt_lookup": SpecCounters(proposed=8, accepted=6, verify_rows=2, emitted=8)})  # no change
    m.spec_totals({"prompt_lookup": SpecCounters(proposed=12, accepted=7, verify_rows=3, emitted=10),
                   "suffix": SpecCounters(proposed=4, accepted=0, verify_rows=1, emitted=1)})
    assert _value(reg, M.SPEC_PROPOSED, "prompt_lookup") == 12
    assert _value(reg, M.SPEC_ACCEPTED, "prompt_lookup") == 7
    assert _value(reg, M.SPEC_VERIFY_ROWS, "prompt_lookup") == 3
    assert _value(reg, M.SPEC_EMITTED, "prompt_lookup") == 10
    assert _value(reg, M.SPEC_PROPOSED, "suffix") == 4 and _value(reg, M.SPEC_ACCEPTED, "suffix") == 0


def test_a_rebuilt_core_counts_from_zero():
    m, reg = _metrics()
    m.spec_totals({"ngram": SpecCounters(proposed=10, accepted=5, verify_rows=4, emitted=9)})
    # the worker restarted: the batcher resets its totals and the fresh core starts again
    m.reset_totals()
    m.spec_totals({"ngram": SpecCounters(proposed=3, accepted=1, verify_rows=1, emitted=2)})
    assert _value(reg, M.SPEC_PROPOSED, "ngram") == 13 and _value(reg, M.SPEC_ACCEPTED, "ngram") == 6
    # ... and a smaller value without a reset is a rebuilt core too, never a negative increment
    m.spec_totals({"ngram": SpecCounters(proposed=2, accepted=2, verify_rows=1, emitted=3)})
    assert _value(reg, M.SPEC_PROPOSED, "ngram") == 15 and _value(reg, M.SPEC_EMITTED, "ngram") == 14


def test_tokens_per_step_per_request_counts_the_tokens_after_the_first():
    m, reg = _metrics()
    m.request_tokens_per_step(completion_tokens=33, decode_steps=32)   # no speculation: 1.0
    m.request_tokens_per_step(completion_tokens=33, decode_steps=8)    # 4 tokens per decode step
    m.request_tokens_per_step(completion_tokens=1, decode_steps=0)     # one token: no decode step, no sample
    labels = {"model": "m", "worker": "w0"}
    assert reg.get_sample_value(f"{M.TOKENS_PER_STEP}_count", labels) == 2
    assert reg.get_sample_value(f"{M.TOKENS_PER_STEP}_sum", labels) == pytest.approx(5.0)
    assert reg.get_sample_value(f"{M.TOKENS_PER_STEP}_bucket", {**labels, "le": "1.0"}) == 1
