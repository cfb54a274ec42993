"""`switchyard trace breakdown`'s inference vs end-to-end split and its one-line verdict, on spans built
by hand (no SDK, no processes)."""
from __future__ import annotations

import pytest

from telemetry import breakdown, tracing
from telemetry.breakdown import Span

MS = 1_000_000   # ns


def _trace(tid: str, scale: float = 1.0, **times) -> list[Span]:
    """One request. Times in ms (scaled):
        router.generate 0-100 (first token event at 40); router.kv_match 2-4; router.publish 5-6
        batcher.receive 8; batcher.prefill 10-30; batcher.decode 30-90
    -> router = 5 - 2 (kv) = 3, kv_index 2, nats = (8 - 5) + (100 - 90) = 13, queue = 10 - 8 = 2,
       prefill 20, decode 60; inference 80 of 100, infrastructure 3 + 2 + 13 = 18."""
    t = {"gen": (0, 100), "first": 40, "kv": (2, 4), "pub": (5, 6), "recv": (8, 9), "pre": (10, 30),
         "dec": (30, 90), **times}
    ns = lambda x: int(x * scale * MS)  # noqa: E731

    def span(sid, name, se, parent=""):
        return Span(tid, sid, parent, name, "svc", ns(se[0]), ns(se[1]))
    gen = span("g", tracing.ROUTER_GENERATE, t["gen"])
    gen.events = [(tracing.FIRST_TOKEN_EVENT, ns(t["first"]))]
    gen.attributes = {"switchyard.request_id": f"req-{tid}"}
    return [gen, span("k", tracing.ROUTER_KV_MATCH, t["kv"], "g"), span("p", tracing.ROUTER_PUBLISH, t["pub"], "g"),
            span("r", tracing.BATCHER_RECEIVE, t["recv"], "p"), span("f", tracing.BATCHER_PREFILL, t["pre"], "r"),
            span("d", tracing.BATCHER_DECODE, t["dec"], "r")]


def test_per_request_inference_and_infrastructure():
    (row,) = breakdown.request_breakdowns(_trace("t1"))
    e = row["e2e"]
    assert (e["router"], e["kv_index"], e["nats"], e["batcher_queue"], e["prefill"], e["decode"]) == \
        pytest.approx((3.0, 2.0, 13.0, 2.0, 20.0, 60.0))
    assert row["inference_ms"] == pytest.approx(80.0)
    assert row["infrastructure_ms"] == pytest.approx(18.0)
    assert row["inference_ratio"] == pytest.approx(0.8)
    rep = breakdown.summarize([row])
    assert rep["verdict"] is None          # 80% inference: nothing to say
    assert rep["share_e2e"]["inference"] == pytest.approx(0.8)


def test_an_infrastructure_bound_run_says_so():
    # prefill 10-15, decode 15-35: inference 25 of 100; nats = (8 - 5) + (100 - 35) = 68;
    # infrastructure = 3 + 2 + 68 = 73 -> 73% of E2E, queue 2%
    spans = _trace("a", pre=(10, 15), dec=(15, 35)) + _trace("b", scale=2.0, pre=(10, 15), dec=(15, 35))
    rows = breakdown.request_breakdowns(spans)
    assert [r["request_id"] for r in rows] == ["req-a", "req-b"]
    rep = breakdown.summarize(rows)
    assert rep["share_e2e"]["inference"] == pytest.approx(0.25)
    assert rep["share_e2e"]["infrastructure"] == pytest.approx(0.73)
    assert rep["inference_ratio"]["p50"] == pytest.approx(0.25)
    assert rep["verdict"] == "infrastructure-bound: router+NATS = 73% of E2E (inference 25%)"
    rep["requests"] = rows
    table = breakdown.format_table(rep)
    assert table.splitlines()[-1] == rep["verdict"]
    assert "E2E split: inference (prefill+decode) 25.0%" in table
