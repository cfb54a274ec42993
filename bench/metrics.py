"""Serving-benchmark arithmetic: pure functions over per-request records (no I/O, no clocks).

Definitions (the ones vLLM's `bench serve` uses, stated here so the numbers can be checked by hand):
- TTFT: first token's arrival - request send time.
- E2E: last chunk's arrival - send time.
- TPOT: (E2E - TTFT) / (output tokens - 1), per request with more than one output token.
- ITL: one value per output token after the first. A chunk carrying k tokens that arrives g after
  the previous chunk contributes k values of g/k (so a request's ITLs sum to E2E - TTFT); extra
  tokens in the first chunk contribute 0.
- ITL at output position k (k >= 2): the gap before output token k, split the same way (a chunk of
  n tokens after a gap g gives each of its tokens g/n). Positions are grouped into the buckets of
  telemetry/metrics.py POSITION_BUCKETS (1, 2-10, 11-50, 51-100, 101-200, 201+), the ones the
  batcher's `switchyard_inter_token_latency_by_position_seconds` histogram uses; bucket "1" has no
  ITL, it is TTFT (reported as ttft_ms).
- Perceived tokens/s (per request, 2+ output tokens): (output tokens - 1) / (E2E - TTFT), the rate
  at which the text streams once it has started (1 / TPOT). Total output tokens/s is per run.
- E2E split (per request, ms): queue, prefill and decode are the batcher's own times from the last
  chunk's usage; router and nats come from traces when the run has them (telemetry/breakdown.py's
  definitions), client_network = client E2E - the router's E2E (gRPC both ways + this client);
  rest = E2E minus every part measured, so the parts add up to E2E. Without traces, rest is the
  whole of client + gRPC + router + NATS. inference = prefill + decode; inference_ratio =
  inference / E2E.
- Percentiles: linear interpolation between closest ranks (numpy's default "linear" method).
- Goodput: successful requests meeting every given SLO, per second of the run.
- Cost: a GPU billed by the hour, busy at the measured throughput.
- Break-even: the monthly token volume (prompt + output, in the workload's mix) above which a GPU
  rented all month costs less than the API would for the same tokens.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from telemetry.breakdown import bound_verdict
from telemetry.metrics import ITL_POSITION_BUCKET_NAMES, itls_by_position, position_bucket

PERCENTILES = (50, 90, 95, 99)
HOURS_PER_MONTH = 730.0                 # 365 * 24 / 12
DEFAULT_API_INPUT_USD_PER_M = 1.25      # GPT-5 list price per 1M input tokens
DEFAULT_API_OUTPUT_USD_PER_M = 10.0     # GPT-5 list price per 1M output tokens


@dataclass
class RequestRecord:
    """What the load generator saw of one request (times in seconds on one monotonic clock)."""
    index: int
    scheduled: float                    # offered arrival time, relative to the run start
    sent: float = 0.0                   # absolute send time
    chunks: list[tuple[float, int]] = field(default_factory=list)   # (arrival time, tokens in chunk)
    done: float | None = None           # absolute time the stream ended (ok or error)
    prompt_tokens: int = 0
    output_tokens: int = 0              # from usage when present, else counted from the chunks
    cached_tokens: int = 0
    error: str | None = None            # gRPC status name ("RESOURCE_EXHAUSTED", ...) or None
    worker_id: str = ""
    group: str = ""                     # workload tag (e.g. which shared prefix)
    request_id: str = ""                # as sent (stack targets), to find the request's trace
    queue_ms: float | None = None       # the batcher's usage times (None: the target has none)
    prefill_ms: float | None = None
    decode_ms: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.done is not None

    @property
    def ttft(self) -> float | None:
        first = next((t for t, n in self.chunks if n > 0), None)
        return None if first is None else first - self.sent

    @property
    def e2e(self) -> float | None:
        return None if self.done is None or not self.ok else self.done - self.sent

    @property
    def tpot(self) -> float | None:
        return tpot(self.ttft, self.e2e, self.output_tokens)

    @property
    def itls(self) -> list[float]:
        return itls_from_chunks(self.chunks)

    @property
    def position_itls(self) -> list[tuple[int, float]]:
        return position_itls_from_chunks(self.chunks)

    @property
    def perceived_tok_s(self) -> float | None:
        return perceived_tok_s(self.ttft, self.e2e, self.output_tokens)


# ---- per-request metrics ---------------------------------------------------------------------
def itls_from_chunks(chunks: list[tuple[float, int]]) -> list[float]:
    """Inter-token latencies from (arrival time, token count) chunks; zero-token chunks are skipped."""
    out: list[float] = []
    prev: float | None = None
    for t, n in chunks:
        if n <= 0:
            continue
        if prev is None:
            out.extend([0.0] * (n - 1))
        else:
            out.extend([(t - prev) / n] * n)
        prev = t
    return out


def position_itls_from_chunks(chunks: list[tuple[float, int]]) -> list[tuple[int, float]]:
    """(output position k, ITL) for every token k >= 2; the same values as itls_from_chunks, in order."""
    out: list[tuple[int, float]] = []
    prev_t: float | None = None
    seen = 0
    for t, n in chunks:
        if n <= 0:
            continue
        out.extend(itls_by_position(seen, n, None if prev_t is None else t - prev_t))
        seen += n
        prev_t = t
    return out


def perceived_tok_s(ttft: float | None, e2e: float | None, output_tokens: int) -> float | None:
    """Output tokens after the first / time after the first (None for fewer than 2 tokens)."""
    if ttft is None or e2e is None or output_tokens < 2 or e2e <= ttft:
        return None
    return (output_tokens - 1) / (e2e - ttft)


def tpot(ttft: float | None, e2e: float | None, output_tokens: int) -> float | None:
    if ttft is None or e2e is None or output_tokens < 2:
        return None
    return (e2e - ttft) / (output_tokens - 1)


# ---- distributions -----------------------------------------------------------------------------
def percentile(xs: list[float], q: float) -> float | None:
    """q in [0, 100]; linear interpolation between closest ranks; None for no data."""
    if not xs:
        return None
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def pct(xs: list[float], q: float) -> float:
    """percentile() for printing and JSON: nan instead of None when there is no data."""
    v = percentile(xs, q)
    return float("nan") if v is None else v


def summarize(xs: list[float], scale: float = 1.0) -> dict:
    """{p50, p90, p95, p99, mean} of xs * scale (None where there is no data)."""
    ys = [x * scale for x in xs]
    out = {f"p{q}": percentile(ys, q) for q in PERCENTILES}
    out["mean"] = sum(ys) / len(ys) if ys else None
    return out


# ---- latency as users feel it -------------------------------------------------------------------
def itl_by_position(records: list[RequestRecord], itl_slo_ms: float | None = None) -> dict:
    """ITL percentiles (ms) per output-position bucket over successful requests, and the buckets
    whose p99 exceeds itl_slo_ms. Bucket "1" is TTFT (its own summary, never flagged here)."""
    by: dict[str, list[float]] = {b: [] for b in ITL_POSITION_BUCKET_NAMES}
    ok = [r for r in records if r.ok]
    for r in ok:
        for k, itl in r.position_itls:
            by[position_bucket(k)].append(itl)
    buckets = {}
    for b, xs in by.items():
        s = summarize(xs, 1000.0)
        s["count"] = len(xs)
        buckets[b] = s
    ttft = summarize([r.ttft for r in ok if r.ttft is not None], 1000.0)
    ttft["count"] = sum(1 for r in ok if r.ttft is not None)
    over = [b for b, s in buckets.items()
            if itl_slo_ms is not None and s["p99"] is not None and s["p99"] > itl_slo_ms]
    return {"buckets": buckets, "ttft": ttft, "itl_slo_ms": itl_slo_ms, "over_slo": over}


def perceived_summary(records: list[RequestRecord]) -> dict:
    """Percentiles of the per-request perceived tokens/s; p10 is the slow tail."""
    xs = [v for r in records if r.ok and (v := r.perceived_tok_s) is not None]
    return {"p10": percentile(xs, 10), "p50": percentile(xs, 50), "p90": percentile(xs, 90),
            "mean": sum(xs) / len(xs) if xs else None, "count": len(xs)}


SPLIT_PARTS = ("client_network", "router", "nats", "queue", "prefill", "decode", "rest")


def e2e_split(e2e_ms: float, queue_ms: float | None, prefill_ms: float | None, decode_ms: float | None,
              trace: dict | None = None) -> dict:
    """One request's E2E (ms) cut into SPLIT_PARTS (None: not measured) + inference figures.

    trace: {"e2e_ms": the router's E2E, "router": ..., "nats": ...} from telemetry/breakdown.py."""
    parts: dict = {"e2e": e2e_ms, "client_network": None, "router": None, "nats": None,
                   "queue": queue_ms, "prefill": prefill_ms, "decode": decode_ms}
    if trace is not None:
        parts["client_network"] = e2e_ms - trace["e2e_ms"]
        parts["router"] = trace["router"]
        parts["nats"] = trace["nats"]
    parts["rest"] = e2e_ms - sum(parts[p] or 0.0 for p in SPLIT_PARTS if p != "rest")
    have_batcher = None not in (queue_ms, prefill_ms, decode_ms)
    parts["inference"] = (prefill_ms + decode_ms) if have_batcher else None
    parts["outside_batcher"] = e2e_ms - queue_ms - prefill_ms - decode_ms if have_batcher else None
    parts["inference_ratio"] = parts["inference"] / e2e_ms if have_batcher and e2e_ms > 0 else None
    return parts


def split_summary(rows: list[dict]) -> dict:
    """Percentiles (ms) of each part over the requests that have it, each part's share of the summed
    E2E of those requests, the inference ratio's percentiles and the one-line verdict (or None)."""
    out: dict = {"requests": len(rows), "traced": sum(1 for r in rows if r["router"] is not None)}
    shares: dict = {}
    for p in SPLIT_PARTS + ("inference", "outside_batcher"):
        have = [r for r in rows if r[p] is not None]
        e2e = sum(r["e2e"] for r in have)
        shares[p] = sum(r[p] for r in have) / e2e if have and e2e > 0 else None
        s = {f"p{q}": percentile([r[p] for r in have], q) for q in (50, 90, 99)}
        s["share_e2e"] = shares[p]
        out[p] = s
    ratios = [r["inference_ratio"] for r in rows if r["inference_ratio"] is not None]
    out["inference_ratio"] = {"p10": percentile(ratios, 10), "p50": percentile(ratios, 50),
                              "p90": percentile(ratios, 90), "run": shares["inference"]}
    traced = out["traced"] == len(rows) and rows
    out["verdict"] = bound_verdict(
        inference=shares["inference"], queue=shares["queue"],
        router_nats=(shares["router"] or 0) + (shares["nats"] or 0) if traced else shares["outside_batcher"],
        client_network=shares["client_network"] if traced else None, split=bool(traced))
    return out


# ---- run-level metrics ---------------------------------------------------------------------------
def meets_slo(r: RequestRecord, slo_ttft_ms: float | None, slo_tpot_ms: float | None,
              slo_e2e_ms: float | None = None) -> bool:
    if not r.ok:
        return False
    if slo_ttft_ms is not None and (r.ttft is None or r.ttft * 1000.0 > slo_ttft_ms):
        return False
    # a one-token answer has no TPOT: nothing to violate
    if slo_tpot_ms is not None and r.tpot is not None and r.tpot * 1000.0 > slo_tpot_ms:
        return False
    if slo_e2e_ms is not None and (r.e2e is None or r.e2e * 1000.0 > slo_e2e_ms):
        return False
    return True


def goodput(records: list[RequestRecord], duration_s: float, slo_ttft_ms: float | None,
            slo_tpot_ms: float | None, slo_e2e_ms: float | None = None) -> float:
    """Requests per second that succeeded within every SLO given."""
    if duration_s <= 0:
        return 0.0
    return sum(1 for r in records if meets_slo(r, slo_ttft_ms, slo_tpot_ms, slo_e2e_ms)) / duration_s


def errors_by_status(records: list[RequestRecord]) -> dict[str, int]:
    return dict(sorted(Counter(r.error for r in records if r.error).items()))


def run_duration(records: list[RequestRecord]) -> float:
    """First send to last stream end."""
    sent = [r.sent for r in records if r.done is not None]
    done = [r.done for r in records if r.done is not None]
    if not sent or not done:
        return 0.0
    return max(done) - min(sent)


def prefix_hit_rate(records: list[RequestRecord]) -> float | None:
    """Cached prompt tokens / prompt tokens over successful requests."""
    prompt = sum(r.prompt_tokens for r in records if r.ok)
    return None if prompt == 0 else sum(r.cached_tokens for r in records if r.ok) / prompt


# ---- cost ------------------------------------------------------------------------------------
def usd_per_1k_tokens(gpu_usd_per_hour: float, tokens_per_s: float) -> float | None:
    """What 1,000 tokens cost on a GPU billed `gpu_usd_per_hour` producing `tokens_per_s`."""
    if tokens_per_s <= 0:
        return None
    return gpu_usd_per_hour / 3600.0 / tokens_per_s * 1000.0


def api_usd_per_token(prompt_tokens: int, output_tokens: int, input_usd_per_m: float,
                      output_usd_per_m: float) -> float | None:
    """The API's blended price per token for this mix of prompt and output tokens."""
    total = prompt_tokens + output_tokens
    if total <= 0:
        return None
    return (prompt_tokens * input_usd_per_m + output_tokens * output_usd_per_m) / total / 1e6


def break_even_tokens_per_month(gpu_usd_per_hour: float, total_tokens_per_s: float, api_usd_per_tok: float | None,
                                hours_per_month: float = HOURS_PER_MONTH) -> dict:
    """Monthly volume above which one GPU rented all month beats the API.

    volume = monthly GPU cost / API price per token. One GPU can serve at most
    throughput * seconds per month; if the break-even volume is above that, every extra GPU
    costs more than the tokens it serves would cost on the API: self-hosting never wins
    (break_even_tokens_per_month is None and never_cheaper is True).
    """
    monthly = gpu_usd_per_hour * hours_per_month
    capacity = max(0.0, total_tokens_per_s) * hours_per_month * 3600.0
    out = {"gpu_usd_per_month": monthly, "capacity_tokens_per_month": capacity,
           "break_even_tokens_per_month": None, "never_cheaper": True}
    if not api_usd_per_tok or api_usd_per_tok <= 0:
        return out
    volume = monthly / api_usd_per_tok
    if volume <= capacity:
        out["break_even_tokens_per_month"] = volume
        out["never_cheaper"] = False
    return out


def cost_report(*, gpu_usd_per_hour: float, output_tok_s: float, total_tok_s: float, prompt_tokens: int,
                output_tokens: int, api_input_usd_per_m: float = DEFAULT_API_INPUT_USD_PER_M,
                api_output_usd_per_m: float = DEFAULT_API_OUTPUT_USD_PER_M) -> dict:
    api_tok = api_usd_per_token(prompt_tokens, output_tokens, api_input_usd_per_m, api_output_usd_per_m)
    be = break_even_tokens_per_month(gpu_usd_per_hour, total_tok_s, api_tok)
    return {
        "gpu_usd_per_hour": gpu_usd_per_hour,
        "api_input_usd_per_m": api_input_usd_per_m,
        "api_output_usd_per_m": api_output_usd_per_m,
        "cost_usd_per_1k_output_tokens": usd_per_1k_tokens(gpu_usd_per_hour, output_tok_s),
        "cost_usd_per_1k_total_tokens": usd_per_1k_tokens(gpu_usd_per_hour, total_tok_s),
        "api_usd_per_1k_total_tokens": None if api_tok is None else api_tok * 1000.0,
        "api_usd_per_1k_output_tokens": api_output_usd_per_m / 1000.0,
        **be,
    }


# ---- everything for one run ------------------------------------------------------------------
def run_report(records: list[RequestRecord], *, duration_s: float | None = None, slo_ttft_ms: float | None = None,
               slo_tpot_ms: float | None = None, slo_e2e_ms: float | None = None, gpu_usd_per_hour: float = 2.0,
               api_input_usd_per_m: float = DEFAULT_API_INPUT_USD_PER_M,
               api_output_usd_per_m: float = DEFAULT_API_OUTPUT_USD_PER_M, itl_slo_ms: float | None = None,
               traces: dict[str, dict] | None = None) -> dict:
    """traces: request id -> its row from telemetry/breakdown.py request_breakdowns (optional)."""
    dur = run_duration(records) if duration_s is None else duration_s
    ok = [r for r in records if r.ok]
    prompt = sum(r.prompt_tokens for r in ok)
    output = sum(r.output_tokens for r in ok)
    out_tok_s = output / dur if dur > 0 else 0.0
    total_tok_s = (prompt + output) / dur if dur > 0 else 0.0
    rep = {
        "num_requests": len(records), "completed": len(ok), "failed": len(records) - len(ok),
        "duration_s": dur, "prompt_tokens": prompt, "output_tokens": output,
        "ttft_ms": summarize([r.ttft for r in ok if r.ttft is not None], 1000.0),
        "tpot_ms": summarize([r.tpot for r in ok if r.tpot is not None], 1000.0),
        "itl_ms": summarize([x for r in ok for x in r.itls], 1000.0),
        "e2e_ms": summarize([r.e2e for r in ok if r.e2e is not None], 1000.0),
        "request_per_s": len(ok) / dur if dur > 0 else 0.0,
        "output_tok_s": out_tok_s, "total_tok_s": total_tok_s,
        "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms, "e2e_ms": slo_e2e_ms},
        "goodput_req_s": goodput(records, dur, slo_ttft_ms, slo_tpot_ms, slo_e2e_ms),
        "errors": errors_by_status(records),
        "prefix_cache_hit_rate": prefix_hit_rate(records),
        "itl_by_position_ms": itl_by_position(records, itl_slo_ms),
        "perceived_tok_s": perceived_summary(records),
    }
    rows = request_rows(records, traces)
    rep["e2e_split_ms"] = split_summary([r["split"] for r in rows if r["split"] is not None])
    rep["requests"] = rows
    rep.update(cost_report(gpu_usd_per_hour=gpu_usd_per_hour, output_tok_s=out_tok_s, total_tok_s=total_tok_s,
                           prompt_tokens=prompt, output_tokens=output, api_input_usd_per_m=api_input_usd_per_m,
                           api_output_usd_per_m=api_output_usd_per_m))
    return rep


def trace_parts(tr: dict | None) -> dict | None:
    """The E2E parts e2e_split takes, from one telemetry/breakdown.py request row."""
    if tr is None:
        return None
    e = tr["e2e"]
    return {"e2e_ms": tr["e2e_ms"], "router": e["router"] + e["kv_index"], "nats": e["nats"]}


def request_rows(records: list[RequestRecord], traces: dict[str, dict] | None = None) -> list[dict]:
    """One row per request for the JSON: its latencies, perceived tok/s and E2E split (ms)."""
    rows = []
    for r in records:
        e2e = r.e2e
        split = None
        if e2e is not None:
            split = e2e_split(e2e * 1000.0, r.queue_ms, r.prefill_ms, r.decode_ms,
                              trace_parts((traces or {}).get(r.request_id)))
        rows.append({"index": r.index, "request_id": r.request_id, "worker_id": r.worker_id, "ok": r.ok,
                     "error": r.error, "output_tokens": r.output_tokens,
                     "ttft_ms": None if r.ttft is None else r.ttft * 1000.0,
                     "e2e_ms": None if e2e is None else e2e * 1000.0,
                     "perceived_tok_s": r.perceived_tok_s, "split": split})
    return rows
