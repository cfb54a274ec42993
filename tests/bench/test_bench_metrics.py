"""bench/metrics.py against hand-computed cases."""
from __future__ import annotations

import pytest

from bench import metrics as M
from bench.metrics import RequestRecord


def test_percentile_linear_interpolation():
    xs = [4.0, 1.0, 3.0, 2.0]                    # sorted 1 2 3 4; rank = (n-1) q/100
    assert M.percentile(xs, 0) == 1.0
    assert M.percentile(xs, 50) == pytest.approx(2.5)      # rank 1.5
    assert M.percentile(xs, 90) == pytest.approx(3.7)      # rank 2.7 -> 3 + 0.7
    assert M.percentile(xs, 99) == pytest.approx(3.97)     # rank 2.97
    assert M.percentile(xs, 100) == 4.0
    assert M.percentile([7.0], 99) == 7.0
    assert M.percentile([], 50) is None


def test_summarize_scales_and_has_every_key():
    s = M.summarize([0.010, 0.020, 0.030], scale=1000.0)
    assert set(s) == {"p50", "p90", "p95", "p99", "mean"}
    assert s["p50"] == pytest.approx(20.0)
    assert s["p90"] == pytest.approx(28.0)                 # rank 1.8 -> 20 + 0.8 * 10
    assert s["mean"] == pytest.approx(20.0)
    assert M.summarize([])["mean"] is None


def test_itl_from_chunk_timestamps():
    # first chunk 1 token at 1.0; 1 token at 1.1; a 2-token chunk at 1.5 (gap 0.4 -> 0.2 each); a
    # zero-token usage chunk at 1.6 is ignored
    chunks = [(1.0, 1), (1.1, 1), (1.5, 2), (1.6, 0)]
    assert M.itls_from_chunks(chunks) == pytest.approx([0.1, 0.2, 0.2])
    # extra tokens in the first chunk arrive with it
    assert M.itls_from_chunks([(2.0, 3), (2.3, 1)]) == pytest.approx([0.0, 0.0, 0.3])
    assert M.itls_from_chunks([]) == []


def _rec(sent, chunks, done, out, error=None, prompt=10, cached=0):
    r = RequestRecord(0, 0.0, sent=sent, chunks=chunks, done=done, output_tokens=out, error=error,
                      prompt_tokens=prompt, cached_tokens=cached)
    return r


def test_request_ttft_tpot_e2e():
    r = _rec(10.0, [(10.05, 1), (10.15, 1), (10.25, 1), (10.30, 0)], 10.30, 3)
    assert r.ttft == pytest.approx(0.05)
    assert r.e2e == pytest.approx(0.30)
    assert r.tpot == pytest.approx((0.30 - 0.05) / 2)
    assert sum(r.itls) == pytest.approx(0.25 - 0.05)       # ITLs sum to last token - first token
    one = _rec(0.0, [(0.2, 1)], 0.2, 1)
    assert one.tpot is None
    failed = _rec(0.0, [], 0.1, 0, error="RESOURCE_EXHAUSTED")
    assert not failed.ok and failed.e2e is None and failed.ttft is None


def test_goodput_counts_requests_meeting_every_slo():
    recs = [_rec(0.0, [(0.040, 1), (0.100, 1)], 0.100, 2),     # ttft 40 ms, tpot 60 ms
            _rec(0.0, [(0.060, 1), (0.080, 1)], 0.080, 2),     # ttft 60 ms  (misses ttft 50)
            _rec(0.0, [(0.010, 1), (0.200, 1)], 0.200, 2),     # tpot 190 ms (misses tpot 100)
            _rec(0.0, [(0.010, 1)], 0.010, 1),                 # one token: no TPOT to miss
            _rec(0.0, [], 0.010, 0, error="RESOURCE_EXHAUSTED")]
    assert M.goodput(recs, 2.0, 50, 100) == pytest.approx(2 / 2.0)
    assert M.goodput(recs, 2.0, None, None) == pytest.approx(4 / 2.0)
    assert M.goodput(recs, 2.0, 50, None) == pytest.approx(3 / 2.0)
    assert M.goodput(recs, 2.0, None, None, slo_e2e_ms=90) == pytest.approx(2 / 2.0)
    assert M.errors_by_status(recs) == {"RESOURCE_EXHAUSTED": 1}


def test_cost_per_1k_tokens():
    # $3.60/h = $0.001/s; 100 tok/s -> $0.00001/token -> $0.01 per 1K
    assert M.usd_per_1k_tokens(3.6, 100.0) == pytest.approx(0.01)
    assert M.usd_per_1k_tokens(3.6, 0.0) is None


def test_api_blended_price_and_break_even():
    # 3M prompt + 1M output tokens at $1.25 / $10 per 1M: (3.75 + 10) / 4M = $3.4375 per 1M
    p = M.api_usd_per_token(3_000_000, 1_000_000, 1.25, 10.0)
    assert p == pytest.approx(3.4375e-6)
    # $2/h * 730 h = $1460/month; break-even volume = 1460 / 3.4375e-6 = 424.727...M tokens/month
    be = M.break_even_tokens_per_month(2.0, 1000.0, p)
    assert be["gpu_usd_per_month"] == pytest.approx(1460.0)
    assert be["capacity_tokens_per_month"] == pytest.approx(1000.0 * 730 * 3600)     # 2.628e9
    assert be["break_even_tokens_per_month"] == pytest.approx(1460.0 / 3.4375e-6)
    assert be["never_cheaper"] is False
    # 100 tok/s can serve only 262.8M tokens a month: below the break-even volume -> never cheaper
    slow = M.break_even_tokens_per_month(2.0, 100.0, p)
    assert slow["break_even_tokens_per_month"] is None and slow["never_cheaper"] is True


def test_run_report_fields_and_throughput():
    recs = [_rec(0.0, [(0.1, 1), (0.2, 1), (0.3, 1), (0.4, 1)], 0.4, 4, prompt=10, cached=5),
            _rec(1.0, [(1.2, 1), (2.0, 1)], 2.0, 2, prompt=10, cached=0)]
    rep = M.run_report(recs, slo_ttft_ms=150, gpu_usd_per_hour=3.6)
    assert rep["duration_s"] == pytest.approx(2.0)          # first send 0.0 -> last end 2.0
    assert rep["output_tok_s"] == pytest.approx(3.0)
    assert rep["request_per_s"] == pytest.approx(1.0)
    assert rep["goodput_req_s"] == pytest.approx(0.5)       # ttft 100 ms ok, 200 ms not
    assert rep["prefix_cache_hit_rate"] == pytest.approx(0.25)
    assert rep["cost_usd_per_1k_output_tokens"] == pytest.approx(0.001 / 3.0 * 1000)
    for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(rep[k]) == {"p50", "p90", "p95", "p99", "mean"}
    assert rep["ttft_ms"]["mean"] == pytest.approx(150.0)
