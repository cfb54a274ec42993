"""`switchyard trace breakdown PATH [--json]`: where time-to-first-token and end-to-end time go.

Reads an OTLP JSON lines file (`switchyard up --trace-file`), takes every trace that has a finished
`router.generate` span with a first-token event, and cuts each request's timeline at span
boundaries (all processes share one host clock):

    t0      router.generate start              t_tok   batcher.prefill end (first token sampled)
    t_pub   router.publish start (NATS send)   t_first router's first-token event (first chunk relayed)
    t_recv  batcher.receive start              t_done  batcher.decode end (last token)
    t_sched batcher.prefill start              t_end   router.generate end

    router        = (t_pub - t0) - kv_index    validate, tokenize, route, subscribe
    kv_index      = the router.kv_match CLIENT span(s) (KvIndex/Match round trip)
    nats          = (t_recv - t_pub) + (t_first - t_tok)      [TTFT]
                    (t_recv - t_pub) + (t_end - t_done)       [E2E]   request out + chunk back
    batcher_queue = t_sched - t_recv           admission + waiting for a slot
    prefill       = t_tok - t_sched            first schedule -> first token (batcher + worker)
    decode        = t_done - t_tok             [E2E only]
    worker_step   = the worker.step spans linked to the request's prefill (TTFT) or prefill+decode
                    (E2E) span (or, for a decode step planned before the first token landed, to
                    batcher.receive): nested inside prefill/decode, so it is not part of the sum.

The top-level components telescope, so they add up to the router-measured TTFT / E2E exactly; what
a client measures adds its own gRPC hop (tests/telemetry/test_breakdown.py checks the tolerance).
Shares are sum(component) / sum(TTFT or E2E) over all traces.

Inference vs end-to-end (the same split `switchyard bench serve` reports, bench/metrics.py): per
request, inference = prefill + decode, infrastructure = router + kv_index + nats, queue =
batcher_queue; inference_ratio = inference / E2E. A run whose inference share of E2E is below
INFERENCE_SHARE_LOW says which part dominates in one line (bound_verdict). The client's own gRPC hop
is not in a trace; `bench serve --traces` adds it as client_network.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field

from telemetry import tracing

COMPONENTS = ["router", "kv_index", "nats", "batcher_queue", "prefill", "decode", "worker_step"]
NESTED = {"worker_step"}
INFERENCE_SHARE_LOW = 0.5     # below this share of E2E in prefill + decode, a run is called bound elsewhere


def bound_verdict(*, inference: float | None, queue: float | None, router_nats: float | None,
                  client_network: float | None = None, split: bool = True) -> str | None:
    """One line when inference (prefill + decode) is under INFERENCE_SHARE_LOW of E2E, naming the
    larger of the queue and the infrastructure (router + NATS; `split=False`: router, NATS, gRPC and
    the client together, not separable without traces); None otherwise. Shares are fractions of E2E."""
    if inference is None or inference >= INFERENCE_SHARE_LOW:
        return None
    infra = (router_nats or 0.0) + (client_network or 0.0)
    if (queue or 0.0) > infra:
        return f"queue-bound: batcher queue = {100 * queue:.0f}% of E2E (inference {100 * inference:.0f}%)"
    if not split:
        return (f"infrastructure-bound: router+NATS = {100 * (router_nats or 0):.0f}% of E2E (with the client "
                f"and gRPC; no traces to split them; inference {100 * inference:.0f}%)")
    extra = f", client+gRPC {100 * client_network:.0f}%" if client_network is not None else ""
    return (f"infrastructure-bound: router+NATS = {100 * (router_nats or 0):.0f}% of E2E "
            f"(inference {100 * inference:.0f}%{extra})")


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    service: str
    start: int
    end: int
    attributes: dict = field(default_factory=dict)
    events: list = field(default_factory=list)      # (name, time ns)
    links: list = field(default_factory=list)       # span ids

    @property
    def ms(self) -> float:
        return (self.end - self.start) / 1e6


def _attr_value(v: dict):
    for k in ("stringValue", "boolValue", "doubleValue"):
        if k in v:
            return v[k]
    if "intValue" in v:
        return int(v["intValue"])
    if "arrayValue" in v:
        return [_attr_value(x) for x in v["arrayValue"].get("values", [])]
    return None


def _attrs(lst) -> dict:
    return {a["key"]: _attr_value(a.get("value", {})) for a in lst or ()}


def load_spans(path: str) -> list[Span]:
    spans = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            req = json.loads(line)
            for rs in req.get("resourceSpans", ()):
                service = _attrs(rs.get("resource", {}).get("attributes")).get("service.name", "")
                for ss in rs.get("scopeSpans", ()):
                    for s in ss.get("spans", ()):
                        spans.append(Span(
                            trace_id=s["traceId"], span_id=s["spanId"], parent_id=s.get("parentSpanId", ""),
                            name=s["name"], service=service, start=int(s["startTimeUnixNano"]),
                            end=int(s["endTimeUnixNano"]), attributes=_attrs(s.get("attributes")),
                            events=[(e["name"], int(e["timeUnixNano"])) for e in s.get("events", ())],
                            links=[lk["spanId"] for lk in s.get("links", ())]))
    return spans


def request_breakdowns(spans: list[Span]) -> list[dict]:
    """One dict per complete request trace: ttft_ms, e2e_ms and each component for both."""
    by_trace: dict[str, list[Span]] = defaultdict(list)
    steps_by_ref: dict[str, list[Span]] = defaultdict(list)
    for s in spans:
        by_trace[s.trace_id].append(s)
        if s.name == tracing.WORKER_STEP:
            for ref in {s.parent_id, *s.links}:
                if ref:
                    steps_by_ref[ref].append(s)
    out = []
    for tid, ss in by_trace.items():
        first = {}
        kv_ms = 0.0
        for s in ss:
            if s.name == tracing.ROUTER_KV_MATCH:
                kv_ms += s.ms
            elif s.name not in first or s.start < first[s.name].start:
                first[s.name] = s
        gen = first.get(tracing.ROUTER_GENERATE)
        pub = first.get(tracing.ROUTER_PUBLISH)
        recv = first.get(tracing.BATCHER_RECEIVE)
        pre = first.get(tracing.BATCHER_PREFILL)
        dec = first.get(tracing.BATCHER_DECODE)
        if not (gen and pub and recv and pre and dec):
            continue
        t_first = next((t for n, t in gen.events if n == tracing.FIRST_TOKEN_EVENT), None)
        if t_first is None:
            continue
        ms = lambda a, b: (b - a) / 1e6  # noqa: E731
        step_pre = {s.span_id: s for s in steps_by_ref.get(pre.span_id, ())}
        step_all = dict(step_pre)
        step_all.update({s.span_id: s for s in steps_by_ref.get(dec.span_id, ())})
        # a decode step planned before the first token landed links batcher.receive
        step_all.update({s.span_id: s for s in steps_by_ref.get(recv.span_id, ())})
        common = {"router": ms(gen.start, pub.start) - kv_ms, "kv_index": kv_ms,
                  "batcher_queue": ms(recv.start, pre.start), "prefill": ms(pre.start, pre.end)}
        ttft = dict(common, nats=ms(pub.start, recv.start) + ms(pre.end, t_first), decode=0.0,
                    worker_step=sum(s.ms for s in step_pre.values()))
        e2e = dict(common, nats=ms(pub.start, recv.start) + ms(dec.end, gen.end), decode=ms(pre.end, dec.end),
                   worker_step=sum(s.ms for s in step_all.values()))
        e2e_ms = ms(gen.start, gen.end)
        inference = e2e["prefill"] + e2e["decode"]
        out.append({"trace_id": tid, "request_id": gen.attributes.get("switchyard.request_id", ""),
                    "worker_id": gen.attributes.get("switchyard.worker_id", ""),
                    "ttft_ms": ms(gen.start, t_first), "e2e_ms": e2e_ms,
                    "ttft": ttft, "e2e": e2e, "worker_steps": len(step_all),
                    "inference_ms": inference, "infrastructure_ms": e2e["router"] + e2e["kv_index"] + e2e["nats"],
                    "inference_ratio": inference / e2e_ms if e2e_ms > 0 else float("nan")})
    out.sort(key=lambda r: r["ttft_ms"])
    return out


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(reqs: list[dict]) -> dict:
    ttft = [r["ttft_ms"] for r in reqs]
    e2e = [r["e2e_ms"] for r in reqs]
    st = lambda xs: {"p50": pct(xs, 50), "p90": pct(xs, 90), "p99": pct(xs, 99),  # noqa: E731
                     "mean": sum(xs) / len(xs) if xs else float("nan")}
    comps = {}
    for c in COMPONENTS:
        in_ttft = [r["ttft"][c] for r in reqs]
        in_e2e = [r["e2e"][c] for r in reqs]
        comps[c] = {"ttft": st(in_ttft), "e2e": st(in_e2e),
                    "share_ttft": sum(in_ttft) / sum(ttft) if ttft and sum(ttft) else float("nan"),
                    "share_e2e": sum(in_e2e) / sum(e2e) if e2e and sum(e2e) else float("nan"),
                    "nested": c in NESTED}
    tot = sum(e2e)
    share = lambda key: sum(r[key] for r in reqs) / tot if tot else float("nan")  # noqa: E731
    inference = share("inference_ms")
    infra = share("infrastructure_ms")
    return {"traces": len(reqs), "ttft_ms": st(ttft), "e2e_ms": st(e2e), "components": comps,
            "inference_ms": st([r["inference_ms"] for r in reqs]),
            "infrastructure_ms": st([r["infrastructure_ms"] for r in reqs]),
            "inference_ratio": {"p10": pct([r["inference_ratio"] for r in reqs], 10),
                                "p50": pct([r["inference_ratio"] for r in reqs], 50),
                                "p90": pct([r["inference_ratio"] for r in reqs], 90)},
            "share_e2e": {"inference": inference, "infrastructure": infra,
                          "queue": comps["batcher_queue"]["share_e2e"]},
            "verdict": bound_verdict(inference=inference, queue=comps["batcher_queue"]["share_e2e"],
                                     router_nats=infra) if tot else None}


def breakdown(path: str) -> dict:
    reqs = request_breakdowns(load_spans(path))
    report = summarize(reqs)
    report["requests"] = reqs
    return report


def format_table(report: dict) -> str:
    lines = [f"{report['traces']} request traces   TTFT p50/p90/p99 "
             f"{report['ttft_ms']['p50']:.2f}/{report['ttft_ms']['p90']:.2f}/{report['ttft_ms']['p99']:.2f} ms   "
             f"E2E p50/p90/p99 {report['e2e_ms']['p50']:.2f}/{report['e2e_ms']['p90']:.2f}/"
             f"{report['e2e_ms']['p99']:.2f} ms",
             f"{'component':16} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'% TTFT':>8} {'% E2E':>8}"]
    for c in COMPONENTS:
        d = report["components"][c]
        # Percentiles of the component within TTFT, except decode (only in E2E).
        s = d["e2e"] if c == "decode" else d["ttft"]
        name = c + (" *" if d["nested"] else "")
        lines.append(f"{name:16} {s['p50']:>9.2f} {s['p90']:>9.2f} {s['p99']:>9.2f} "
                     f"{100 * d['share_ttft']:>7.1f}% {100 * d['share_e2e']:>7.1f}%")
    lines.append("* inside prefill/decode (the worker's engine steps), not added to the total; "
                 "worker_step percentiles are its time within TTFT, decode's within E2E")
    sh, ir = report.get("share_e2e"), report.get("inference_ratio")
    if sh and ir:
        lines.append(f"E2E split: inference (prefill+decode) {100 * sh['inference']:.1f}%, queue "
                     f"{100 * sh['queue']:.1f}%, infrastructure (router+kv_index+nats) "
                     f"{100 * sh['infrastructure']:.1f}%;"
                     f" inference/E2E per request p10/p50/p90 {ir['p10']:.2f}/{ir['p50']:.2f}/{ir['p90']:.2f}")
    if report.get("verdict"):
        lines.append(report["verdict"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="switchyard trace breakdown", description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--json", action="store_true", help="the full report (with per-request rows) as JSON")
    args = ap.parse_args(argv)
    try:
        report = breakdown(args.path)
    except (OSError, ValueError) as e:
        print(f"switchyard trace breakdown: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        if not report["traces"]:
            print(f"no complete request traces in {args.path}", file=sys.stderr)
            return 1
        print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
