"""Latency as users feel it (bench/metrics.py): ITL by output position, perceived tokens/s, and the
end-to-end split, on synthetic chunk timelines whose expected figures are worked out by hand here."""
from __future__ import annotations

import pytest

from bench import metrics as M
from bench.metrics import RequestRecord
from telemetry.breakdown import bound_verdict
from telemetry.metrics import position_bucket


def _rec(index, sent, chunks, out, **kw):
    done = max(t for t, _ in chunks)
    return RequestRecord(index, 0.0, sent=sent, chunks=chunks, done=done, output_tokens=out, **kw)


def test_position_buckets_edges():
    expect = {1: "1", 2: "2-10", 10: "2-10", 11: "11-50", 50: "11-50", 51: "51-100", 100: "51-100",
              101: "101-200", 200: "101-200", 201: "201+", 5000: "201+"}
    for k, name in expect.items():
        assert position_bucket(k) == name, k
    with pytest.raises(ValueError):
        position_bucket(0)


def test_position_itls_from_a_chunk_timeline():
    # token 1 at 1.0 (TTFT, no ITL); token 2 at 1.1; tokens 3-4 in one chunk at 1.5 (gap 0.4 -> 0.2
    # each); a zero-token usage chunk at 1.6 adds nothing; token 5 at 1.9
    chunks = [(1.0, 1), (1.1, 1), (1.5, 2), (1.6, 0), (1.9, 1)]
    got = M.position_itls_from_chunks(chunks)
    assert [k for k, _ in got] == [2, 3, 4, 5]
    assert [v for _, v in got] == pytest.approx([0.1, 0.2, 0.2, 0.4])
    # the same values, in the same order, as the position-free ITL list
    assert [v for _, v in got] == pytest.approx(M.itls_from_chunks(chunks))
    # extra tokens of the first chunk arrive with it: ITL 0 at positions 2 and 3
    got = M.position_itls_from_chunks([(2.0, 3), (2.3, 1)])
    assert [k for k, _ in got] == [2, 3, 4] and [v for _, v in got] == pytest.approx([0.0, 0.0, 0.3])


def test_itl_by_position_buckets_percentiles_and_slo_flag():
    # request A: 12 tokens, one per chunk. Gaps before tokens 2..10 are 10 ms; 11 and 12 are 100 ms.
    t, chunks = 0.0, [(0.05, 1)]
    t = 0.05
    for k in range(2, 13):
        t += 0.010 if k <= 10 else 0.100
        chunks.append((t, 1))
    a = _rec(0, 0.0, chunks, 12)
    # request B: 3 tokens: TTFT 0.2 s, then gaps of 30 ms and 50 ms (positions 2 and 3)
    b = _rec(1, 1.0, [(1.2, 1), (1.23, 1), (1.28, 1)], 3)
    # a failed request is left out
    c = RequestRecord(2, 0.0, sent=0.0, chunks=[(0.1, 1), (5.0, 1)], done=5.0, output_tokens=2, error="INTERNAL")
    rep = M.itl_by_position([a, b, c], itl_slo_ms=60.0)
    b210 = rep["buckets"]["2-10"]
    # 2-10: A's nine 10 ms gaps + B's 30 and 50 ms -> 11 values; sorted: 10 x9, 30, 50
    assert b210["count"] == 11
    assert b210["p50"] == pytest.approx(10.0)
    # p90: rank 0.9 * 10 = 9 -> the 10th value, 30
    assert b210["p90"] == pytest.approx(30.0)
    # p99: rank 9.9 -> 30 + 0.9 * (50 - 30) = 48
    assert b210["p99"] == pytest.approx(48.0)
    b1150 = rep["buckets"]["11-50"]
    assert b1150["count"] == 2 and b1150["p50"] == pytest.approx(100.0) and b1150["p99"] == pytest.approx(100.0)
    assert rep["buckets"]["51-100"]["count"] == 0 and rep["buckets"]["51-100"]["p99"] is None
    assert "1" not in rep["buckets"]
    # bucket 1 is TTFT: A 50 ms, B 200 ms
    assert rep["ttft"]["count"] == 2 and rep["ttft"]["p50"] == pytest.approx(125.0)
    # only 11-50 has p99 above 60 ms
    assert rep["over_slo"] == ["11-50"] and rep["itl_slo_ms"] == 60.0
    assert M.itl_by_position([a, b])["over_slo"] == []   # no SLO given: nothing flagged


def test_perceived_tokens_per_second():
    # 5 tokens: first at 0.5 s, last at 1.5 s -> 4 tokens in 1 s after the first = 4 tok/s, whatever TTFT was
    r = _rec(0, 0.0, [(0.5, 1), (0.75, 1), (1.0, 1), (1.25, 1), (1.5, 1)], 5)
    assert r.perceived_tok_s == pytest.approx(4.0)
    # one token: no rate after the first
    assert _rec(1, 0.0, [(0.5, 1)], 1).perceived_tok_s is None
    # per run: p50 and the slow tail (p10) over 4 / 2 / 1 / 8 tok/s
    recs = [r,
            _rec(2, 0.0, [(0.1, 1), (0.6, 1), (1.1, 1)], 3),   # 2 tokens in 1.0 s -> 2
            _rec(3, 0.0, [(0.1, 1), (1.1, 1)], 2),             # 1 token in 1.0 s -> 1
            _rec(4, 0.0, [(0.1, 1), (0.35, 2)], 3)]            # 2 tokens in 0.25 s -> 8
    s = M.perceived_summary(recs)
    assert s["count"] == 4
    assert s["p50"] == pytest.approx(3.0)                 # sorted 1 2 4 8: rank 1.5 -> 3
    assert s["p10"] == pytest.approx(1.3)                 # rank 0.3 -> 1 + 0.3 * 1
    assert s["mean"] == pytest.approx(3.75)


def test_e2e_split_without_traces_sums_to_e2e():
    # E2E 500 ms; the batcher saw queue 40, prefill 60, decode 300 -> 100 ms outside the batcher
    s = M.e2e_split(500.0, 40.0, 60.0, 300.0)
    assert s["client_network"] is None and s["router"] is None and s["nats"] is None
    assert s["rest"] == pytest.approx(100.0)
    assert sum(s[p] or 0.0 for p in M.SPLIT_PARTS) == pytest.approx(500.0)
    assert s["inference"] == pytest.approx(360.0)
    assert s["outside_batcher"] == pytest.approx(100.0)
    assert s["inference_ratio"] == pytest.approx(0.72)


def test_e2e_split_with_a_trace_sums_to_e2e():
    # client E2E 500 ms, router E2E 480 ms -> client + gRPC 20; router 15 (incl. KV index), NATS 25;
    # queue 40, prefill 60, decode 330 -> rest = 500 - (20 + 15 + 25 + 40 + 60 + 330) = 10
    trace = {"e2e_ms": 480.0, "router": 15.0, "nats": 25.0}
    s = M.e2e_split(500.0, 40.0, 60.0, 330.0, trace)
    expect = {"client_network": 20.0, "router": 15.0, "nats": 25.0, "queue": 40.0, "prefill": 60.0,
              "decode": 330.0, "rest": 10.0}
    for p, v in expect.items():
        assert s[p] == pytest.approx(v), p
    assert sum(s[p] for p in M.SPLIT_PARTS) == pytest.approx(500.0)
    assert s["inference_ratio"] == pytest.approx(390.0 / 500.0)


def test_trace_parts_from_a_breakdown_row():
    row = {"e2e_ms": 480.0, "e2e": {"router": 12.0, "kv_index": 3.0, "nats": 25.0, "batcher_queue": 40.0,
                                    "prefill": 60.0, "decode": 330.0, "worker_step": 300.0}}
    assert M.trace_parts(row) == {"e2e_ms": 480.0, "router": 15.0, "nats": 25.0}
    assert M.trace_parts(None) is None


def test_split_summary_shares_and_infrastructure_verdict():
    # two requests, no traces: E2E 100 and 300 ms; inference 20 + 60 = 80 of 400 (20%);
    # queue 0 + 20 = 20 (5%); outside the batcher 80 + 220 = 300 (75%)
    rows = [M.e2e_split(100.0, 0.0, 5.0, 15.0), M.e2e_split(300.0, 20.0, 10.0, 50.0)]
    s = M.split_summary(rows)
    assert s["requests"] == 2 and s["traced"] == 0
    assert s["inference"]["share_e2e"] == pytest.approx(0.20)
    assert s["queue"]["share_e2e"] == pytest.approx(0.05)
    assert s["rest"]["share_e2e"] == pytest.approx(0.75)
    assert s["router"]["p50"] is None
    assert s["inference_ratio"]["run"] == pytest.approx(0.20)
    assert s["inference_ratio"]["p50"] == pytest.approx((0.2 + 0.2) / 2)
    assert s["verdict"].startswith("infrastructure-bound: router+NATS = 75% of E2E")
    assert "no traces" in s["verdict"]


def test_bound_verdict_cases():
    assert bound_verdict(inference=0.8, queue=0.1, router_nats=0.1) is None
    assert bound_verdict(inference=None, queue=0.1, router_nats=0.1) is None
    assert bound_verdict(inference=0.3, queue=0.5, router_nats=0.2).startswith("queue-bound: batcher queue = 50%")
    line = bound_verdict(inference=0.3, queue=0.1, router_nats=0.45, client_network=0.15)
    assert line == "infrastructure-bound: router+NATS = 45% of E2E (inference 30%, client+gRPC 15%)"


def test_run_report_has_the_new_keys():
    a = _rec(0, 0.0, [(0.1, 1), (0.2, 1), (0.3, 1)], 3, queue_ms=10.0, prefill_ms=20.0, decode_ms=200.0,
             request_id="r0")
    rep = M.run_report([a], itl_slo_ms=50.0)
    assert set(rep["itl_by_position_ms"]["buckets"]) == {"2-10", "11-50", "51-100", "101-200", "201+"}
    assert rep["itl_by_position_ms"]["over_slo"] == ["2-10"]          # two 100 ms gaps
    assert rep["perceived_tok_s"]["p50"] == pytest.approx(10.0)       # 2 tokens in 0.2 s
    row = rep["requests"][0]
    assert row["request_id"] == "r0" and row["split"]["rest"] == pytest.approx(300.0 - 230.0)
    assert rep["e2e_split_ms"]["requests"] == 1
    # with the request's trace row, router and NATS are split out
    tr = {"r0": {"e2e_ms": 290.0, "e2e": {"router": 4.0, "kv_index": 1.0, "nats": 20.0}}}
    row = M.run_report([a], traces=tr)["requests"][0]["split"]
    assert [row["client_network"], row["router"], row["nats"]] == pytest.approx([10.0, 5.0, 20.0])
    assert row["rest"] == pytest.approx(300.0 - 10.0 - 5.0 - 20.0 - 230.0)
