"""Prometheus metrics of every Switchyard service: ALL metric names live here, as constants.

Each process builds only its own group (RouterMetrics, BatcherMetrics, WorkerMetrics,
KvIndexMetrics) in a registry (the default one in a service; a fresh one in tests) and serves it
with `serve(port)` on `/metrics`. Labels: model, worker, priority where they apply.

The OTel GenAI semantic-convention histograms (`gen_ai.server.time_to_first_token`,
`gen_ai.server.time_per_output_token`, `gen_ai.server.request.duration`) are exported under their
Prometheus translation (dots -> underscores, unit suffix `_seconds`), which is what an OTel
collector's Prometheus exporter would produce; GENAI_OTEL_NAMES maps one to the other.

Hot-path rule: observations are O(1) per request event or per step; per-step gauges and counters
fed from the scheduler's cumulative stats are updated from the heartbeat loop, not per token.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

# ---- names (Prometheus family names; counters without the `_total` suffix prometheus_client adds)
# router
TTFT = "switchyard_time_to_first_token_seconds"
ITL = "switchyard_inter_token_latency_seconds"
TPOT = "switchyard_time_per_output_token_seconds"
E2E = "switchyard_e2e_request_latency_seconds"
REQUESTS = "switchyard_requests"                       # _total{model,worker,priority,finish_reason}
REQUEST_ERRORS = "switchyard_request_errors"           # _total{model,code}
ROUTER_IN_FLIGHT = "switchyard_router_in_flight_requests"
ROUTER_MIGRATIONS = "switchyard_router_migrations"      # _total{reason}: streams moved to another replica
GENAI_TTFT = "gen_ai_server_time_to_first_token_seconds"
GENAI_TPOT = "gen_ai_server_time_per_output_token_seconds"
GENAI_DURATION = "gen_ai_server_request_duration_seconds"
# batcher
QUEUE_TIME = "switchyard_queue_time_seconds"
ITL_BY_POSITION = "switchyard_inter_token_latency_by_position_seconds"   # {model,worker,position_bucket}
PREFILL_TIME = "switchyard_prefill_time_seconds"
DECODE_TIME = "switchyard_decode_time_seconds"
REQUESTS_RUNNING = "switchyard_requests_running"
REQUESTS_WAITING = "switchyard_requests_waiting"
KV_USAGE = "switchyard_kv_cache_usage_ratio"
PREFIX_HIT_RATE = "switchyard_prefix_cache_hit_rate"
PROMPT_TOKENS = "switchyard_prompt_tokens"             # _total
GENERATION_TOKENS = "switchyard_generation_tokens"     # _total
PREEMPTIONS = "switchyard_preemptions"                 # _total
REJECTIONS = "switchyard_rejections"                   # _total{model,worker,reason}
BATCHER_FINISHED = "switchyard_batcher_finished_requests"  # _total{model,worker,priority,finish_reason}
COST_PER_1K = "switchyard_cost_usd_per_1k_tokens"
COST_TOTAL = "switchyard_cost_usd"                     # _total
GPU_PRICE = "switchyard_gpu_price_usd_per_hour"
# worker
STEP_TIME = "switchyard_worker_step_duration_seconds"
STEP_BATCH = "switchyard_worker_step_batch_size"
STEP_TOKENS = "switchyard_worker_step_tokens"          # _total
# kv index
KV_MATCHES = "switchyard_kv_index_match_requests"      # _total
KV_MATCH_TIME = "switchyard_kv_index_match_duration_seconds"
KV_INDEXED_BLOCKS = "switchyard_kv_index_blocks"
KV_INDEX_WORKERS = "switchyard_kv_index_workers"
# model pool (services/pool.py, served by the launcher; labels: model[, state])
MODEL_QUEUE_DEPTH = "switchyard_model_queue_depth"            # waiting + running over the model's replicas
MODEL_REPLICAS = "switchyard_model_replicas"                  # {model,state}: loading | ready | draining
MODEL_REPLICAS_DESIRED = "switchyard_model_replicas_desired"  # what the scaler wants (KEDA scales on queue depth)
MODEL_STATE = "switchyard_model_state"                        # {model,state} 1 for the current state
MODEL_LOADS = "switchyard_model_loads"                        # _total{model,outcome}
MODEL_LOAD_TIME = "switchyard_model_load_seconds"             # start of a replica -> first healthy heartbeat
MODEL_EVICTIONS = "switchyard_model_evictions"                # _total{model}: LRU evictions for room
# tenants (router/tenancy.py; issue 17)
TENANT_REQUESTS = "switchyard_tenant_requests"                # _total{tenant,service_class}: admitted
TENANT_TOKENS = "switchyard_tenant_tokens"                    # _total{tenant,direction}: input | output
TENANT_REJECTIONS = "switchyard_tenant_rejections"            # _total{tenant,reason}
TENANT_QUEUE_TIME = "switchyard_tenant_queue_time_seconds"    # {tenant}: batcher queue time
TENANT_COST = "switchyard_tenant_cost_usd"                    # _total{tenant,basis}: gpu | api
TENANT_STREAMS = "switchyard_tenant_open_streams"             # {tenant}: on this router
# fair shares (batcher/scheduler.py; issue 17): tokens the batcher scheduled per tenant
TENANT_PROCESSED_TOKENS = "switchyard_batcher_tenant_processed_tokens"   # _total{model,worker,tenant,phase}
# speculative decoding (batcher/spec_policy.py; issue 21): per method, from EngineCore.spec_totals() each step
SPEC_PROPOSED = "switchyard_spec_proposed_tokens"     # _total{model,worker,method}: drafts verified
SPEC_ACCEPTED = "switchyard_spec_accepted_tokens"     # _total{model,worker,method}: drafts accepted
SPEC_VERIFY_ROWS = "switchyard_spec_verify_rows"      # _total{model,worker,method}: one request's speculative step
SPEC_EMITTED = "switchyard_spec_emitted_tokens"       # _total{model,worker,method}: tokens those rows emitted
TOKENS_PER_STEP = "switchyard_request_tokens_per_step"   # {model,worker}: tokens after the first / decode steps

GENAI_OTEL_NAMES = {GENAI_TTFT: "gen_ai.server.time_to_first_token",
                    GENAI_TPOT: "gen_ai.server.time_per_output_token",
                    GENAI_DURATION: "gen_ai.server.request.duration"}

# Buckets: the GenAI semantic conventions' advisory boundaries where they exist.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# tokens per decode step of one request: 1 without speculation, up to k + 1 with it (k <= 16)
TOKENS_PER_STEP_BUCKETS = (1.0, 1.1, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 17.0)
SPEC_FIELDS = ("proposed", "accepted", "verify_rows", "emitted")   # batcher/spec_policy.py SpecCounters

# Output-position buckets for ITL by position (bench/metrics.py and the batcher use these same ones).
# "ITL at position k" (k >= 2) is the gap before output token k: the time from the chunk that carried
# token k-1 to the chunk that carries token k; a chunk of n tokens after a gap g gives each of its
# tokens g/n, and tokens 2..n of the first chunk get 0. Position 1 has no ITL: its latency is TTFT
# (bucket "1" is reported as TTFT by the bench and is not a label of the histogram).
POSITION_BUCKETS = ((1, 1, "1"), (2, 10, "2-10"), (11, 50, "11-50"), (51, 100, "51-100"), (101, 200, "101-200"),
                    (201, None, "201+"))
POSITION_BUCKET_NAMES = tuple(name for _, _, name in POSITION_BUCKETS)
ITL_POSITION_BUCKET_NAMES = POSITION_BUCKET_NAMES[1:]


def position_bucket(k: int) -> str:
    """The bucket name of output position k (1-based)."""
    for lo, hi, name in POSITION_BUCKETS:
        if k >= lo and (hi is None or k <= hi):
            return name
    raise ValueError(f"output position must be >= 1, got {k}")


def itls_by_position(prev_tokens: int, new_tokens: int, gap_s: float | None) -> list[tuple[int, float]]:
    """(position, ITL) for each token of a chunk of `new_tokens` arriving `gap_s` after the previous
    chunk of a request that had produced `prev_tokens` before it (gap_s None: this is the first chunk).
    Position 1 (the first token, TTFT) yields nothing."""
    out = []
    for i in range(new_tokens):
        k = prev_tokens + i + 1
        if k < 2:
            continue
        out.append((k, 0.0 if gap_s is None else gap_s / new_tokens))
    return out


RLABELS = ("model", "worker", "priority")
WLABELS = ("model", "worker")
GENAI_LABELS = ("gen_ai_request_model", "gen_ai_operation_name")
GENAI_OPERATION = "text_completion"


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY):
        r = registry
        self.ttft = Histogram(TTFT, "Time to first token as the router relays it", RLABELS, registry=r,
                              buckets=TTFT_BUCKETS)
        self.itl = Histogram(ITL, "Time between consecutive streamed chunks of a request", RLABELS, registry=r,
                             buckets=TPOT_BUCKETS)
        self.tpot = Histogram(TPOT, "Mean time per output token after the first, per request", RLABELS,
                              registry=r, buckets=TPOT_BUCKETS)
        self.e2e = Histogram(E2E, "Request latency from Generate to the last chunk", RLABELS, registry=r,
                             buckets=DURATION_BUCKETS)
        self.requests = Counter(REQUESTS, "Generate requests finished, by finish reason",
                                RLABELS + ("finish_reason",), registry=r)
        self.errors = Counter(REQUEST_ERRORS, "Generate requests that ended with a gRPC error, by status code",
                              ("model", "code"), registry=r)
        self.in_flight = Gauge(ROUTER_IN_FLIGHT, "Open Generate streams", registry=r)
        self.migrations = Counter(ROUTER_MIGRATIONS, "Streams moved to another replica mid-request, by reason "
                                  "(worker_lost, worker_hung, heartbeat, unavailable)", ("reason",), registry=r)
        self.genai_ttft = Histogram(GENAI_TTFT, "gen_ai.server.time_to_first_token", GENAI_LABELS, registry=r,
                                    buckets=TTFT_BUCKETS)
        self.genai_tpot = Histogram(GENAI_TPOT, "gen_ai.server.time_per_output_token", GENAI_LABELS, registry=r,
                                    buckets=TPOT_BUCKETS)
        self.genai_duration = Histogram(GENAI_DURATION, "gen_ai.server.request.duration", GENAI_LABELS,
                                        registry=r, buckets=DURATION_BUCKETS)

    def request(self, model: str, worker: str, priority: int) -> "RequestTimer":
        return RequestTimer(self, model, worker, str(priority))


class RequestTimer:
    """Per-request router observations: labelled children resolved once, O(1) per chunk."""
    __slots__ = ("m", "labels", "t0", "t_first", "t_last", "_itl", "model")

    def __init__(self, m: RouterMetrics, model: str, worker: str, priority: str):
        self.m = m
        self.model = model
        self.labels = (model, worker, priority)
        self.t0 = time.perf_counter()
        self.t_first = 0.0
        self.t_last = 0.0
        self._itl = None

    def start_at(self, t0: float) -> "RequestTimer":
        self.t0 = t0
        return self

    def chunk(self) -> float:
        """Call per relayed chunk; returns now."""
        now = time.perf_counter()
        if not self.t_first:
            self.t_first = now
            ttft = now - self.t0
            self.m.ttft.labels(*self.labels).observe(ttft)
            self.m.genai_ttft.labels(self.model, GENAI_OPERATION).observe(ttft)
            self._itl = self.m.itl.labels(*self.labels)
        else:
            self._itl.observe(now - self.t_last)
        self.t_last = now
        return now

    def finish(self, finish_reason: str, completion_tokens: int) -> None:
        now = self.t_last or time.perf_counter()
        m = self.m
        m.e2e.labels(*self.labels).observe(now - self.t0)
        m.genai_duration.labels(self.model, GENAI_OPERATION).observe(now - self.t0)
        if completion_tokens > 1 and self.t_first:
            tpot = (now - self.t_first) / (completion_tokens - 1)
            m.tpot.labels(*self.labels).observe(tpot)
            m.genai_tpot.labels(self.model, GENAI_OPERATION).observe(tpot)
        m.requests.labels(*self.labels, finish_reason).inc()


class CostMeter:
    """$ per GPU-hour -> $ per 1K generated tokens (windowed tokens/s) and each request's share.

    Attribution (O(1) per step, O(1) per request event): a step that took dt seconds costs
    dt * price/s, split evenly over the tokens it computed. `integral` accumulates the per-token
    cost of each step; a decoding request computes one token per step, so its decode cost is the
    difference of the integral between its first and last token, and its prefill cost is its
    uncached prompt tokens times the per-token cost of the step that produced its first token.
    Preempted-and-recomputed requests are slightly under-charged (the recompute is not billed to
    them). `total` is the sum of all steps' cost (the busy GPU time).
    """

    def __init__(self, price_per_hour: float, window_s: float = 30.0):
        self.price_per_s = price_per_hour / 3600.0
        self.integral = 0.0
        self.total = 0.0
        self.last_token_cost = 0.0
        self._window: deque = deque()
        self._window_s = window_s

    def step(self, seconds: float, tokens: int) -> float:
        cost = seconds * self.price_per_s
        self.total += cost
        self.last_token_cost = c = cost / tokens if tokens > 0 else 0.0
        self.integral += c
        return cost

    def first_token_base(self, uncached_prompt_tokens: int) -> float:
        """Stored per request at its first token; cost at the end = integral - base."""
        return self.integral - uncached_prompt_tokens * self.last_token_cost

    def per_1k_tokens(self, generated_total: int, now: float | None = None) -> float:
        """$ per 1K generated tokens at the tokens/s measured over the window (idle time included)."""
        now = time.monotonic() if now is None else now
        w = self._window
        w.append((now, generated_total))
        while len(w) > 2 and now - w[0][0] > self._window_s:
            w.popleft()
        (t0, n0) = w[0]
        if now - t0 <= 0 or generated_total <= n0:
            return math.nan
        tps = (generated_total - n0) / (now - t0)
        return 1000.0 * self.price_per_s / tps


class BatcherMetrics:
    def __init__(self, model: str, worker: str, price_per_hour: float, registry: CollectorRegistry = REGISTRY):
        r = registry
        self.model, self.worker = model, worker
        self.queue = Histogram(QUEUE_TIME, "Arrival at the batcher to first schedule", RLABELS, registry=r,
                               buckets=TTFT_BUCKETS)
        self.prefill = Histogram(PREFILL_TIME, "First schedule to first token", RLABELS, registry=r,
                                 buckets=TTFT_BUCKETS)
        self.decode = Histogram(DECODE_TIME, "First token to last token", RLABELS, registry=r,
                                buckets=DURATION_BUCKETS)
        self.itl_by_position = Histogram(ITL_BY_POSITION, "Gap before output token k (k >= 2) as the batcher emits "
                                         "it, by output position bucket", WLABELS + ("position_bucket",),
                                         registry=r, buckets=TPOT_BUCKETS)
        self._itl_children: dict = {}
        self._last_emit: dict[str, tuple[int, float]] = {}   # request id -> (tokens emitted, when)
        self.running = Gauge(REQUESTS_RUNNING, "Requests running", WLABELS, registry=r)
        self.waiting = Gauge(REQUESTS_WAITING, "Requests waiting", WLABELS, registry=r)
        self.kv_usage = Gauge(KV_USAGE, "Fraction of KV cache blocks in use", WLABELS, registry=r)
        self.hit_rate = Gauge(PREFIX_HIT_RATE, "Prefix-cache hit rate (tokens)", WLABELS, registry=r)
        self.prompt_tokens = Counter(PROMPT_TOKENS, "Prompt tokens admitted", WLABELS, registry=r)
        self.generation_tokens = Counter(GENERATION_TOKENS, "Tokens generated", WLABELS, registry=r)
        self.preemptions = Counter(PREEMPTIONS, "Requests preempted (recompute)", WLABELS, registry=r)
        self.tenant_tokens = Counter(TENANT_PROCESSED_TOKENS, "Tokens scheduled per tenant (the fair-share "
                                     "counters' input), phase prefill | decode", WLABELS + ("tenant", "phase"),
                                     registry=r)
        self.rejections = Counter(REJECTIONS, "Requests rejected by the batcher, by reason",
                                  WLABELS + ("reason",), registry=r)
        self.finished = Counter(BATCHER_FINISHED, "Requests finished by the batcher",
                                RLABELS + ("finish_reason",), registry=r)
        # speculative decoding: the engine's cumulative per-method counters, exported by difference
        mlab = WLABELS + ("method",)
        self.spec = {"proposed": Counter(SPEC_PROPOSED, "Draft tokens verified, by speculation method", mlab,
                                         registry=r),
                     "accepted": Counter(SPEC_ACCEPTED, "Draft tokens accepted by verification, by method", mlab,
                                         registry=r),
                     "verify_rows": Counter(SPEC_VERIFY_ROWS, "Verification rows (one request's speculative "
                                            "decode in one step), by method", mlab, registry=r),
                     "emitted": Counter(SPEC_EMITTED, "Tokens emitted by verification rows (accepted drafts + 1 "
                                        "each), by method", mlab, registry=r)}
        self._spec_children: dict = {}
        self._spec_last: dict[str, tuple] = {}      # method -> the SPEC_FIELDS values last exported
        self.tokens_per_step = Histogram(TOKENS_PER_STEP, "Output tokens after the first / decode steps of each "
                                         "finished request (1 without speculation)", WLABELS, registry=r,
                                         buckets=TOKENS_PER_STEP_BUCKETS)
        self.cost_per_1k = Gauge(COST_PER_1K, "USD per 1K generated tokens at the measured tokens/s",
                                 WLABELS, registry=r)
        self.cost_total = Counter(COST_TOTAL, "USD of GPU time spent in engine steps", WLABELS, registry=r)
        self.gpu_price = Gauge(GPU_PRICE, "Configured GPU price, USD per hour", WLABELS, registry=r)
        self.gpu_price.labels(model, worker).set(price_per_hour)
        self.cost = CostMeter(price_per_hour)
        self._cost_total = self.cost_total.labels(model, worker)
        self._last: dict[str, int] = {}

    def relabel(self, model: str) -> None:
        if model != self.model:
            self.model = model
            self._itl_children.clear()
            self._spec_children.clear()
            self._cost_total = self.cost_total.labels(model, self.worker)
            self.gpu_price.labels(model, self.worker).set(self.cost.price_per_s * 3600.0)

    def step(self, seconds: float, tokens: int) -> None:
        self._cost_total.inc(self.cost.step(seconds, tokens))

    def tokens_emitted(self, request_id: str, total_tokens: int, new_tokens: int, now: float,
                       finished: bool = False) -> None:
        """A chunk of `new_tokens` output tokens of a request goes out at `now` (perf_counter s),
        `total_tokens` its output count including them: ITL by position (definition at
        POSITION_BUCKETS). O(new tokens) per chunk, one dict entry per running request."""
        last = self._last_emit.pop(request_id, None) if finished else self._last_emit.get(request_id)
        if new_tokens > 0:
            prev = total_tokens - new_tokens
            gap = None if prev == 0 else None if last is None else now - last[1]
            # (prev > 0 with no previous chunk seen: the gap is unknown, nothing is observed)
            for k, itl in (itls_by_position(prev, new_tokens, gap) if prev == 0 or last is not None else ()):
                b = position_bucket(k)
                child = self._itl_children.get(b)
                if child is None:
                    child = self._itl_children[b] = self.itl_by_position.labels(self.model, self.worker, b)
                child.observe(itl)
            if not finished:
                self._last_emit[request_id] = (total_tokens, now)

    def forget(self, request_id: str) -> None:
        """A request ended without a finishing chunk (aborted)."""
        self._last_emit.pop(request_id, None)

    def reject(self, reason: str) -> None:
        self.rejections.labels(self.model, self.worker, reason).inc()

    def spec_totals(self, totals: dict) -> None:
        """Per step: the engine's cumulative per-method counters (EngineCore.spec_totals(), method ->
        SpecCounters) into the spec counters, by difference. O(methods); a smaller value than last
        time means the core was rebuilt, so it counts from there."""
        for method, c in totals.items():
            now = (c.proposed, c.accepted, c.verify_rows, c.emitted)
            last = self._spec_last.get(method)
            if now == last:
                continue
            self._spec_last[method] = now
            kids = self._spec_children.get(method)
            if kids is None:
                kids = self._spec_children[method] = tuple(self.spec[f].labels(self.model, self.worker, method)
                                                           for f in SPEC_FIELDS)
            if last is None or any(v < v0 for v, v0 in zip(now, last)):
                last = (0, 0, 0, 0)   # a rebuilt core: its counts so far are all new
            for child, v, v0 in zip(kids, now, last):
                if v > v0:
                    child.inc(v - v0)

    def request_tokens_per_step(self, completion_tokens: int, decode_steps: int) -> None:
        """A finished request's tokens per decode step: its tokens after the first (which its prefill
        produced) over its decode steps (Usage.decode_steps); 1.0 without speculation. No
        observation without decode steps."""
        if decode_steps > 0:
            self.tokens_per_step.labels(self.model, self.worker).observe((completion_tokens - 1) / decode_steps)

    def request_finished(self, priority: int, finish_reason: str, queue_ms: float, prefill_ms: float,
                         decode_ms: float) -> None:
        lab = (self.model, self.worker, str(priority))
        self.queue.labels(*lab).observe(queue_ms / 1000.0)
        self.prefill.labels(*lab).observe(prefill_ms / 1000.0)
        self.decode.labels(*lab).observe(decode_ms / 1000.0)
        self.finished.labels(*lab, finish_reason or "unknown").inc()

    def update_from_stats(self, s) -> None:
        """From the scheduler's stats (heartbeat loop): gauges, and counters by delta of the totals."""
        lab = (self.model, self.worker)
        self.running.labels(*lab).set(s.num_running)
        self.waiting.labels(*lab).set(s.num_waiting)
        self.kv_usage.labels(*lab).set(s.kv_usage)
        self.hit_rate.labels(*lab).set(s.prefix_cache_hit_rate)
        for name, counter, value in (("p", self.prompt_tokens, s.prompt_tokens_total),
                                     ("g", self.generation_tokens, s.generation_tokens_total),
                                     ("x", self.preemptions, s.num_preemptions)):
            last = self._last.get(name, 0)
            if value > last:
                counter.labels(*lab).inc(value - last)
            self._last[name] = value   # a smaller value: the core was rebuilt, count from there
        for tenant, t in getattr(s, "tenants", {}).items():   # per tenant (batcher/scheduler.py tenant_tokens)
            for phase, value in (("prefill", t.prefill_tokens), ("decode", t.decode_tokens)):
                key = f"t:{tenant}:{phase}"
                last = self._last.get(key, 0)
                if value > last:
                    self.tenant_tokens.labels(*lab, tenant, phase).inc(value - last)
                self._last[key] = value
        per_1k = self.cost.per_1k_tokens(s.generation_tokens_total)
        if not math.isnan(per_1k):
            self.cost_per_1k.labels(*lab).set(per_1k)

    def reset_totals(self) -> None:
        self._last.clear()
        self._last_emit.clear()   # a fresh core: the old requests are gone
        self._spec_last.clear()


class WorkerMetrics:
    def __init__(self, model: str, worker: str, registry: CollectorRegistry = REGISTRY):
        lab = (model, worker)
        self.step_time = Histogram(STEP_TIME, "Engine step wall time on the worker", WLABELS, registry=registry,
                                   buckets=STEP_BUCKETS).labels(*lab)
        self.batch = Histogram(STEP_BATCH, "Requests per engine step", WLABELS, registry=registry,
                               buckets=BATCH_BUCKETS).labels(*lab)
        self.tokens = Counter(STEP_TOKENS, "Tokens computed by engine steps", WLABELS,
                              registry=registry).labels(*lab)

    def step(self, seconds: float, batch: int, tokens: int) -> None:
        self.step_time.observe(seconds)
        self.batch.observe(batch)
        self.tokens.inc(tokens)


class KvIndexMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY):
        self.matches = Counter(KV_MATCHES, "KvIndex/Match calls", ("model",), registry=registry)
        self.match_time = Histogram(KV_MATCH_TIME, "KvIndex/Match handling time", registry=registry,
                                    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05))
        self.blocks = Gauge(KV_INDEXED_BLOCKS, "Blocks in the global prefix index, per worker", ("worker",),
                            registry=registry)
        self.workers = Gauge(KV_INDEX_WORKERS, "Workers the KV index hears from", registry=registry)



class TenantMetrics:
    """Per-tenant accounting at the router (router/tenancy.py): O(1) per request event."""

    def __init__(self, registry: CollectorRegistry = REGISTRY):
        r = registry
        self.requests = Counter(TENANT_REQUESTS, "Generate requests admitted, per tenant and service class",
                                ("tenant", "service_class"), registry=r)
        self.tokens = Counter(TENANT_TOKENS, "Tokens per tenant: input (prompt) and output (generated)",
                              ("tenant", "direction"), registry=r)
        self.rejections = Counter(TENANT_REJECTIONS, "Requests refused per tenant, by reason (unauthenticated, "
                                  "permission, tokens_per_minute, max_streams, max_queued, max_tokens)",
                                  ("tenant", "reason"), registry=r)
        self.queue_time = Histogram(TENANT_QUEUE_TIME, "Time a tenant's requests waited in the batcher queue "
                                    "(Usage.queue_ms)", ("tenant",), registry=r, buckets=TTFT_BUCKETS)
        self.cost = Counter(TENANT_COST, "USD per tenant: at the configured GPU price (gpu) and at the "
                            "configured API token prices (api)", ("tenant", "basis"), registry=r)
        self.streams = Gauge(TENANT_STREAMS, "Open Generate streams per tenant on this router", ("tenant",),
                             registry=r)


# -- embeddings (batcher/embedding_batcher.py, issue 20)
EMBED_REQUESTS = "switchyard_embed_requests"              # _total{model,worker}: Embed requests answered
EMBED_TEXTS = "switchyard_embed_texts"                    # _total{model,worker}: texts embedded
EMBED_TOKENS = "switchyard_embed_tokens"                  # _total{model,worker}: their tokens
EMBED_FORWARD = "switchyard_embed_forward_seconds"        # {model,worker}: one packed EmbedBatch round trip
EMBED_FORWARD_TEXTS = "switchyard_embed_forward_texts"    # {model,worker}: texts per packed forward
EMBED_QUEUE_TIME = "switchyard_embed_queue_time_seconds"  # {model,worker}: admitted -> first text sent
EMBED_QUEUED_TOKENS = "switchyard_embed_queued_tokens"    # {model,worker}: tokens waiting for a forward


ALL_NAMES = frozenset(v for k, v in dict(globals()).items()
                      if k.isupper() and isinstance(v, str) and v.startswith(("switchyard_", "gen_ai_")))

_server_lock = threading.Lock()


def serve(port: int | None, host: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY):
    """Serve /metrics on host:port in a daemon thread (None: not served). Returns the bound port."""
    if port is None:
        return None
    import os
    host = os.environ.get("SWITCHYARD_METRICS_HOST") or host   # 0.0.0.0 in containers
    from prometheus_client import start_http_server
    with _server_lock:
        try:
            server, _thread = start_http_server(port, addr=host, registry=registry)
        except OSError as e:
            # The launcher picked a free port, but something took it before this process bound it
            # (a race on a busy machine). Serving metrics elsewhere beats failing the service.
            server, _thread = start_http_server(0, addr=host, registry=registry)
            import logging
            logging.getLogger("switchyard.metrics").warning(
                "/metrics port %d unavailable (%s); serving on %d instead", port, e, server.server_port)
    return server.server_port


# -- durable bulk jobs (router/batch_runner.py, issue 20)
BATCH_ITEMS = "switchyard_batch_items"            # _total{state}: item results stored (completed, failed, ...)
BATCH_RETRIES = "switchyard_batch_item_retries"   # _total{code}: item attempts nak'ed for another try
BATCH_IN_FLIGHT = "switchyard_batch_items_in_flight"


class BatchMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY):
        r = registry
        self.items = Counter(BATCH_ITEMS, "Bulk-job item results stored, by state (completed, failed, cancelled, "
                             "dead_letter)", ("state",), registry=r)
        self.retries = Counter(BATCH_RETRIES, "Bulk-job item attempts retried later, by gRPC status",
                               ("code",), registry=r)
        self.in_flight = Gauge(BATCH_IN_FLIGHT, "Bulk-job items the router's runner is running now", registry=r)


class EmbeddingMetrics:
    """The embedding batcher's metrics (O(1) per forward and per request)."""

    def __init__(self, model: str, worker: str, registry: CollectorRegistry = REGISTRY):
        r, labels = registry, ("model", "worker")
        self.requests = Counter(EMBED_REQUESTS, "Embed requests answered", labels, registry=r).labels(model, worker)
        self.texts = Counter(EMBED_TEXTS, "Texts embedded", labels, registry=r).labels(model, worker)
        self.tokens = Counter(EMBED_TOKENS, "Tokens of the texts embedded", labels, registry=r).labels(model, worker)
        self.forward = Histogram(EMBED_FORWARD, "One packed Worker/EmbedBatch call, seconds", labels, registry=r,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)).labels(model, worker)
        self.forward_texts = Histogram(EMBED_FORWARD_TEXTS, "Texts per packed forward", labels, registry=r,
                                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)).labels(model, worker)
        self.queue_time = Histogram(EMBED_QUEUE_TIME, "Embed request admitted -> its first text sent to the worker",
                                    labels, registry=r,
                                    buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 5)).labels(model, worker)
        self.queued_tokens = Gauge(EMBED_QUEUED_TOKENS, "Tokens waiting for a forward", labels,
                                   registry=r).labels(model, worker)
