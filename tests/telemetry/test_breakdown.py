"""`switchyard trace breakdown` (telemetry/breakdown.py).

Without processes: a hand-timed trace, written by the SDK and our OTLP-JSON file exporter, must give each
component the value worked out by hand below - a wrong cut point moves time between components while
the parts still add up, so the sum alone proves nothing. On the traced stack: the parts add up to the
TTFT / end-to-end time the client measured itself, within the client <-> router hop.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time

import pytest

from protos.switchyard.v1 import inference_pb2_grpc
from telemetry import breakdown, tracing
from tests.e2e.conftest import channel, gen_request
from tests.telemetry.conftest import LONG_PROMPT

# Stated tolerance: the router-side TTFT (what the components add up to) lies inside the client's
# TTFT; the difference is the client <-> router gRPC hop, at most 10 ms + 15% on this shared box.
ABS_TOL_MS, REL_TOL = 10.0, 0.15
TOP_LEVEL = [c for c in breakdown.COMPONENTS if c not in breakdown.NESTED]
MS = 1_000_000   # ns


def _write_trace_file(path) -> None:
    """Two complete request traces (r1, r2 = r1 with every duration doubled), one without a first token
    and one without a decode span, through the real SDK and telemetry.file_exporter. Times in ms:

        r1  router.generate 0-100 (first-token event at 40)   router.kv_match 2-3 and 3-3.5 (1.5 ms)
            router.validate 0.5-1.5   router.publish 5-6   batcher.receive 6.5-7   batcher.queue 7-10
            batcher.prefill 10-30   batcher.decode 30-95
            worker.step A 12-28 (child of prefill)   B 29-33 (a decode planned before the first token:
            child of receive)   C 34-40 (child of decode)   D 41-47 (r2's step, also linked to r1's decode)
    """
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import Link, set_span_in_context

    from telemetry.file_exporter import OtlpJsonFileExporter

    exporter = OtlpJsonFileExporter(str(path))
    tracers = {}
    for svc in ("router", "kv-manager", "batcher", "worker"):
        provider = TracerProvider(resource=Resource.create({"service.name": f"switchyard-{svc}"}))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracers[svc] = provider.get_tracer("test")

    def span(svc, name, start, end, parent=None, links=(), attrs=None, events=()):
        s = tracers[svc].start_span(name, context=set_span_in_context(parent) if parent else None,
                                    start_time=int(start * MS), attributes=attrs,
                                    links=[Link(x.get_span_context()) for x in links])
        for ev, t in events:
            s.add_event(ev, timestamp=int(t * MS))
        s.end(end_time=int(end * MS))
        return s

    def request(rid, k, complete=True, first_token=True):
        """k: time scale. Returns the spans a worker.step can hang off."""
        t0 = 1_000.0 * (1 + int(rid[1:]))
        at = lambda ms: t0 + k * ms  # noqa: E731
        gen = tracers["router"].start_span(tracing.ROUTER_GENERATE, start_time=int(at(0) * MS),
                                           attributes={"switchyard.request_id": rid, "switchyard.worker_id": "w0"})
        if first_token:
            gen.add_event(tracing.FIRST_TOKEN_EVENT, timestamp=int(at(40) * MS))
        span("router", tracing.ROUTER_VALIDATE, at(0.5), at(1.5), gen)
        span("router", tracing.ROUTER_KV_MATCH, at(2), at(3), gen)
        span("router", tracing.ROUTER_KV_MATCH, at(3), at(3.5), gen)
        pub = span("router", tracing.ROUTER_PUBLISH, at(5), at(6), gen)
        recv = span("batcher", tracing.BATCHER_RECEIVE, at(6.5), at(7), pub)
        span("batcher", tracing.BATCHER_QUEUE, at(7), at(10), recv)
        pre = span("batcher", tracing.BATCHER_PREFILL, at(10), at(30), recv)
        dec = span("batcher", tracing.BATCHER_DECODE, at(30), at(95), recv) if complete else None
        gen.end(end_time=int(at(100) * MS))
        return at, recv, pre, dec

    at, recv, pre, dec = request("r1", 1)
    at2, _, _, dec2 = request("r2", 2)
    span("worker", tracing.WORKER_STEP, at(12), at(28), pre, links=[pre])
    span("worker", tracing.WORKER_STEP, at(29), at(33), recv, links=[recv])
    span("worker", tracing.WORKER_STEP, at(34), at(40), dec, links=[dec])
    span("worker", tracing.WORKER_STEP, at(41), at(47), dec2, links=[dec2, dec])
    request("r3", 1, first_token=False)       # never produced a token: not a breakdown row
    request("r4", 1, complete=False)          # no batcher.decode span: incomplete, skipped
    exporter.shutdown()


def test_each_component_gets_the_time_between_its_own_span_boundaries(tmp_path):
    path = tmp_path / "trace.jsonl"
    _write_trace_file(path)
    rows = {r["request_id"]: r for r in breakdown.request_breakdowns(breakdown.load_spans(str(path)))}
    assert set(rows) == {"r1", "r2"}
    r1 = rows["r1"]
    assert r1["worker_id"] == "w0" and r1["worker_steps"] == 4
    assert r1["ttft_ms"] == pytest.approx(40) and r1["e2e_ms"] == pytest.approx(100)
    # router: generate start -> publish start, less the KV index calls; nats: publish -> receive, plus
    # prefill end (token sampled) -> the router relays it (TTFT) / decode end -> generate end (E2E)
    want_ttft = {"router": 5 - 1.5, "kv_index": 1.5, "nats": 1.5 + 10, "batcher_queue": 3.5, "prefill": 20,
                 "decode": 0, "worker_step": 16}
    want_e2e = dict(want_ttft, nats=1.5 + 5, decode=65, worker_step=16 + 4 + 6 + 6)
    assert r1["ttft"] == pytest.approx(want_ttft, abs=1e-6)
    assert r1["e2e"] == pytest.approx(want_e2e, abs=1e-6)
    r2 = rows["r2"]                            # every duration doubled; its own steps: only D
    assert r2["ttft"] == pytest.approx({**{c: 2 * v for c, v in want_ttft.items()}, "worker_step": 0}, abs=1e-6)
    assert r2["e2e"]["worker_step"] == pytest.approx(6) and r2["worker_steps"] == 1

    report = breakdown.breakdown(str(path))
    assert report["traces"] == 2
    assert report["components"]["prefill"]["share_ttft"] == pytest.approx(60 / 120)
    assert report["components"]["decode"]["share_e2e"] == pytest.approx(65 * 3 / 300)
    assert report["components"]["nats"]["ttft"]["p50"] == pytest.approx((11.5 + 23) / 2)
    assert report["ttft_ms"]["p99"] == pytest.approx(40 + 0.99 * 40)


def test_breakdown_parts_add_up_to_measured_ttft(traced_stack):
    """The parts add up to what the client measured (TTFT and end-to-end), within the client <-> router
    hop; each lies where its own spans say (worker steps inside prefill, the KV index call inside the
    router's share)."""
    client: dict[str, tuple[float, float]] = {}

    async def main():
        async with channel(traced_stack.router) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            for i in range(4):
                rid = f"bd-{i}"
                t0 = time.perf_counter()
                first = None
                async for _ in stub.Generate(gen_request(LONG_PROMPT, max_tokens=3, request_id=rid), timeout=120):
                    first = first if first is not None else 1000 * (time.perf_counter() - t0)
                client[rid] = (first, 1000 * (time.perf_counter() - t0))
    asyncio.run(main())

    deadline = time.monotonic() + 60
    while True:   # batch span processors export every second
        spans = breakdown.load_spans(traced_stack.trace_file)
        rows = {r["request_id"]: r for r in breakdown.request_breakdowns(spans)}
        done = set(client) <= set(rows) and all(rows[r]["worker_steps"] >= 3 for r in client)
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert set(client) <= set(rows), f"missing traces: {set(client) - set(rows)}"
    by_id = {s.span_id: s for s in spans}
    for rid, (ttft, e2e) in client.items():
        r = rows[rid]
        for measured, parts_of, name in ((ttft, r["ttft"], "TTFT"), (e2e, r["e2e"], "E2E")):
            parts = sum(parts_of[c] for c in TOP_LEVEL)
            assert parts <= measured + 0.5, (rid, name, parts, measured)
            assert measured - parts <= ABS_TOL_MS + REL_TOL * measured, (rid, name, parts, measured, parts_of)
            assert all(parts_of[c] >= -0.5 for c in TOP_LEVEL), (rid, name, parts_of)
        gen = next(s for s in spans if s.name == tracing.ROUTER_GENERATE
                   and s.attributes.get("switchyard.request_id") == rid)
        mine = [s for s in spans if s.trace_id == gen.trace_id]
        prefill = next(s for s in mine if s.name == tracing.BATCHER_PREFILL)
        steps = [s for s in spans if s.name == tracing.WORKER_STEP and prefill.span_id in (s.parent_id, *s.links)]
        assert steps and all(prefill.start <= s.start and s.end <= prefill.end + MS for s in steps)   # nested
        assert 0 < r["ttft"]["worker_step"] <= r["ttft"]["prefill"] + 0.5
        kv = [s for s in mine if s.name == tracing.ROUTER_KV_MATCH]          # two workers: Match was asked
        assert kv and r["ttft"]["kv_index"] > 0 and all(by_id[s.parent_id].name == tracing.ROUTER_ROUTE for s in kv)

    # The CLI: table and --json over every trace in the file.
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert breakdown.main([str(traced_stack.trace_file), "--json"]) == 0
    report = json.loads(out.getvalue())
    assert report["traces"] >= 4 and {r["request_id"] for r in report["requests"]} >= set(client)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert breakdown.main([str(traced_stack.trace_file)]) == 0
    table = out.getvalue()
    for c in breakdown.COMPONENTS:
        assert c in table
