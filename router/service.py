"""The router: the only public endpoint (switchyard.v1.Inference and Admin over grpc.aio).

Per Generate: validate -> tokenize -> block hashes -> KvIndex/Match (only when there is a
choice) -> pick a worker -> subscribe sy.tok.<id> -> publish sy.req.<worker> -> relay chunks.
A client cancel or deadline cancels this handler; the `finally` publishes sy.cancel.<id> so the
batcher frees the request's blocks.

Migration (issue 16): when the replica of a stream dies (its batcher reports the worker lost), hangs
(a heartbeat with `unhealthy_reason`, or an error chunk with reason worker_hung) or goes silent
(dropped from the heartbeat table), the stream moves to another live replica of the model: the same
BatchRequest with `resume_token_ids` = the tokens the client already has and `attempt` + 1 (chunks of
an older attempt are dropped), after a cancel aimed at the old replica. At most `migration_limit`
moves per request; with no replica left the client gets UNAVAILABLE naming the cause. Every way a
stream ends early publishes the cancel, unless the batcher itself ended it (finish or error chunk).
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import nats.errors

from common import subjects
from common.bus_codec import FINISH_FROM_PB
from common.config import StackConfig
from common.replicas import EXPIRE_EVERY_S
from common.wait_limit import wait_limit
from common.waiting import Pulse
from kv_manager.block_hash import block_hashes
from protos.switchyard.v1 import bus_pb2, common_pb2, inference_pb2, inference_pb2_grpc, kv_index_pb2, kv_index_pb2_grpc
from router import admission_gate, routing
from router.adapter_control import AdapterControl
from router.adapter_registry import AdapterRegistry
from router.recent_prefixes import RecentPrefixes, merge_matches
from router.validation import (
    CHUNK_ERROR_STATUS,
    RequestError,
    check_bus_size,
    check_input,
    check_limits,
    check_prompt_tokens,
    check_stop_token_ids,
    invalid,
    validate_generate,
)
from telemetry import propagation, tracing
from telemetry.metrics import RouterMetrics
from workers.step_codec import sampling_to_proto

log = logging.getLogger("switchyard.router")

MATCH_TIMEOUT_S = 0.25   # KV locality is a hint: route on load alone rather than wait longer
MAX_REROUTES = 3         # a pool request refused before its first token (replica unloading) tries this many others
FALLBACK_MODEL_LEN = 131072   # the context assumed for size limits before any worker reported its own
TOKENIZE_THREADS = 2     # tokenizing runs here, off the event loop (heartbeats and other streams go on)
TOKENIZE_INLINE_CHARS = 1024   # ... but a prompt this short costs less to encode than the thread hop


class _WorkerGone:
    """Put into a stream's queue when its worker leaves the table or reports itself hung."""

    def __init__(self, worker_id: str, message: str, reason: str):
        self.worker_id = worker_id
        self.message = message
        self.reason = reason   # the migrations metric's label: heartbeat | worker_hung | nats_down


# Error chunk reasons (TokenChunk.error_reason) after which a stream moves to another replica.
_NOT_MIGRATED = ("deadline",)


class Router(inference_pb2_grpc.InferenceServicer, inference_pb2_grpc.AdminServicer):
    def __init__(self, cfg: StackConfig, nc, kv_channel: grpc.aio.Channel | None, tokenizer_loader=None,
                 metrics: RouterMetrics | None = None):
        self.cfg = cfg
        from router.tenancy import Tenancy  # tenants: admission, quotas, per-tenant accounting (issue 17)
        self.tenancy = Tenancy(cfg, served=metrics is not None)
        if metrics is None:  # not served: a private registry (several routers may share a process)
            from prometheus_client import CollectorRegistry
            metrics = RouterMetrics(CollectorRegistry())
        self.metrics = metrics
        self.nc = nc
        self.kv = kv_index_pb2_grpc.KvIndexStub(kv_channel) if kv_channel is not None else None
        self.table = routing.WorkerTable(cfg.worker_timeout_s)
        self.recent_prefixes = RecentPrefixes()   # predicted overlap until KV events arrive
        self.draining = False
        self._load_tokenizer = tokenizer_loader
        self._tokenizers: dict = {}
        self._tokenize_pool = ThreadPoolExecutor(TOKENIZE_THREADS, thread_name_prefix="router-tokenize")
        self._streams: dict[str, tuple[str, asyncio.Queue]] = {}   # request id -> (worker id, queue)
        self._stream_ended = Pulse()   # fired as each Generate ends (drain waits on it)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._subs = []
        self.pool_routing = None   # router/catalog_routing.PoolRouting with a model pool
        # LoRA adapters that should be served (config, catalogue, Admin/LoadAdapter); pushed to workers
        # by router/adapter_control.py, which also serves the adapter admin calls.
        self.adapters = AdapterRegistry()
        self.adapter_control = AdapterControl(self)
        self.adapter_control.add_config_adapters()

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        await self.tokenizer(self.cfg.model)  # load before SERVING: the first request must not pay it
        self._subs.append(await self.nc.subscribe(subjects.ALL_HEARTBEATS, cb=self._on_heartbeat))
        self._tasks.append(asyncio.create_task(
            self.table.expire_every(EXPIRE_EVERY_S, self._stop, on_expired=self._worker_expired), name="router-expire"))
        if self.cfg.pool_config:   # a model pool: model selection in router/catalog_routing.py
            from router.catalog_routing import PoolRouting
            self.pool_routing = PoolRouting(self)
            await self.pool_routing.start()
        await self.adapter_control.start()
        await self.tenancy.start(self.nc)

    async def stop(self) -> None:
        self._stop.set()
        for t in self._tasks:
            t.cancel()
        await self.adapter_control.stop()
        await self.tenancy.stop()
        if self.pool_routing is not None:
            await self.pool_routing.stop()
        for s in self._subs:
            try:
                await s.unsubscribe()
            except nats.errors.Error as e:   # closed or draining already: nothing more arrives
                log.debug("unsubscribe: %r", e)
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    async def drain(self, grace: float) -> None:
        """Refuse new requests; wait (up to grace) for the open streams to finish: returns as the last
        one ends."""
        self.draining = True
        if not await self._stream_ended.wait_for(lambda: not self._streams, grace):
            log.warning("drain: %d stream(s) still open after %.1fs", len(self._streams), grace)

    async def tokenizer(self, model: str):
        tok = self._tokenizers.get(model)
        if tok is None:
            loader = self._load_tokenizer
            if loader is None:
                from common.tokenizers import load_tokenizer as loader
            tok = await asyncio.get_running_loop().run_in_executor(None, loader, model)
            self._tokenizers[model] = tok
        return tok

    def known_models(self) -> list[str]:
        pool = self.pool_routing.catalog.names if self.pool_routing is not None else ()
        return sorted({self.cfg.model, *pool, *(w.model for w in self.table.workers.values() if w.model)})

    # ---- heartbeats ----------------------------------------------------------------------------
    async def _on_heartbeat(self, msg) -> None:
        hb = bus_pb2.Heartbeat.FromString(msg.data)
        joined = hb.worker_id not in self.table
        view = self.table.observe(hb)
        if hb.unhealthy_reason:   # hung (batcher/liveness.py): its streams move now, not after a timeout
            self._fail_worker_streams(hb.worker_id, f"worker {hb.worker_id}: {hb.unhealthy_reason}", "worker_hung")
        if not joined:
            return
        # A worker (re)joining: keep the router's own in-flight count for it.
        view.in_flight = sum(1 for w, _ in self._streams.values() if w == hb.worker_id)
        self.adapter_control.worker_joined()

    def _worker_expired(self, wid: str) -> None:
        log.warning("worker %s silent for %.1fs: dropped", wid, self.cfg.worker_timeout_s)
        if not getattr(self.nc, "is_connected", True):
            self._fail_worker_streams(wid, "NATS is down (the router lost its connection to nats-server; no "
                                           f"word from worker {wid} for {self.cfg.worker_timeout_s:.1f}s)",
                                      "nats_down")
            return
        self._fail_worker_streams(wid, f"worker {wid} stopped responding (no heartbeat for "
                                       f"{self.cfg.worker_timeout_s:.1f}s)", "heartbeat")

    def _fail_worker_streams(self, worker_id: str, message: str, reason: str) -> None:
        for w, q in self._streams.values():
            if w == worker_id:
                q.put_nowait(_WorkerGone(worker_id, message, reason))

    def _migration_target(self, model: str, adapter_id: str | None, leaving: str) -> str | None:
        """Another routable replica of the same served model (and adapter) for a stream leaving
        `leaving`: the least loaded (its prefix is recomputed anyway)."""
        views = [w for w in self.table.routable(model)
                 if w.worker_id != leaving and (not adapter_id or w.serves(adapter_id))]
        return min(views, key=lambda w: (w.load, w.worker_id)).worker_id if views else None

    async def _publish_cancel(self, rid: str, worker_id: str = "", reason: str = "") -> None:
        """sy.cancel.<rid>; with worker_id only that replica's batcher acts (the stream moved away)."""
        try:
            await self.nc.publish(subjects.cancel(rid), bus_pb2.Cancel(
                request_id=rid, worker_id=worker_id, reason=reason).SerializeToString())
        except nats.errors.Error:
            log.warning("could not publish cancel for %s", rid, exc_info=True)

    # ---- routing -------------------------------------------------------------------------------
    def known_adapters(self) -> set[str]:
        """LoRA adapter names some routable worker advertises in its heartbeat, and registered ones
        (a request for one not served yet waits for it: AdapterControl.wait_served)."""
        return self.table.adapters() | self.adapter_control.names()

    def _admission_gate(self, v, requested_class: str, context) -> set[str] | None:
        """Refuse now (RESOURCE_EXHAUSTED, with retry-after) an interactive request that no replica's
        forecast says could get its first token within its deadline or max_queue_delay_ms
        (router/admission_gate.py); else the ids of the replicas that could (None: no restriction)."""
        if self.tenancy.service_class(requested_class) != "interactive":
            return None   # batch work waits for idle capacity by design
        limit, what = wait_limit(context.time_remaining(), self.cfg.max_queue_delay_ms / 1000)
        if not limit or limit <= 0:
            return None
        views = self.table.routable(v.model)
        if v.adapter_id:
            views = [w for w in views if w.serves(v.adapter_id)]
        ok, refusal = admission_gate.check(views, limit, what, v.model)
        if refusal is not None:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal.message,
                               retry_after_ms=refusal.retry_after_ms)
        return {w.worker_id for w in ok} if views else None

    async def _pick_worker(self, model: str, token_ids: list[int], adapter_id: str | None = None,
                           allowed: set[str] | None = None) -> str:
        """The replica for a request. `allowed`: the ones the admission gate found could serve it in
        time (ignored if none of them is routable any more)."""
        views = self.table.routable(model)
        if not views:
            raise RequestError(grpc.StatusCode.UNAVAILABLE,
                               f"no healthy worker serves model {model!r} right now; retry")
        if adapter_id:   # only workers serving the adapter; KV hashes are per adapter
            views = [w for w in views if w.serves(adapter_id)]
            if not views:
                raise RequestError(grpc.StatusCode.NOT_FOUND,
                                   f"adapter {adapter_id!r} is not served for model {model!r}", "adapter_id")
        if allowed is not None:
            views = [w for w in views if w.worker_id in allowed] or views
        if len(views) == 1:
            return views[0].worker_id  # no choice to make: skip the KV index round trip
        block_size = views[0].heartbeat.block_size or self.cfg.engine.block_size
        matched: dict[str, int] = {}
        hashes = block_hashes(token_ids, block_size, adapter_id)
        if hashes and self.kv is not None and routing.needs_kv_match(self.cfg.routing_policy):
            try:
                resp = await self.kv.Match(kv_index_pb2.MatchRequest(model=model, block_hashes=hashes),
                                           timeout=MATCH_TIMEOUT_S)
                matched = {m.worker_id: m.matched_blocks for m in resp.workers}
            except grpc.aio.AioRpcError as e:
                log.debug("KvIndex/Match failed (%s): routing on load only", e.code())
        if hashes and routing.needs_kv_match(self.cfg.routing_policy):
            matched = merge_matches(matched, self.recent_prefixes.match(hashes))
        ids = {w.worker_id for w in views}
        cands = [c for c in self.table.candidates(model, matched) if c.worker_id in ids]
        if self.pool_routing is not None:   # bounded imbalance between a pool model's replicas
            from router.catalog_routing import choose_bounded
            chosen = choose_bounded(cands, len(hashes), self.cfg.overlap_weight, self.cfg.load_weight,
                                    self.cfg.routing_policy, self.pool_routing.catalog.pool.max_imbalance).worker_id
        else:
            chosen = routing.choose(cands, len(hashes), self.cfg.overlap_weight, self.cfg.load_weight,
                                    policy=self.cfg.routing_policy).worker_id
        self.recent_prefixes.record(chosen, hashes)
        return chosen

    def _max_model_len(self, model: str) -> int:
        lens = [w.heartbeat.max_model_len for w in self.table.routable(model) if w.heartbeat.max_model_len]
        return min(lens) if lens else (self.cfg.engine.max_model_len or 1 << 30)

    def _limit_model_len(self, model: str) -> int:
        """The context the size limits assume (before the model is resolved or any worker reported): the
        model's routable workers', else the longest any worker reports, else the configured one."""
        lens = [w.heartbeat.max_model_len for w in self.table.routable(model) if w.heartbeat.max_model_len]
        if lens:
            return min(lens)
        lens = [w.heartbeat.max_model_len for w in self.table.workers.values() if w.heartbeat.max_model_len]
        return max(lens) if lens else (self.cfg.engine.max_model_len or FALLBACK_MODEL_LEN)

    def _bus_limit(self) -> int:
        """The most the router may publish: the config's nats_max_payload and the server's max_payload."""
        server = getattr(self.nc, "max_payload", 0) or 0
        server = server if isinstance(server, int) else 0
        return min(self.cfg.nats_max_payload, server) if server > 0 else self.cfg.nats_max_payload

    async def _encode(self, model: str, prompt: str, messages: list[dict]) -> tuple[list[int], object]:
        """(token ids, tokenizer). A plain prompt of up to TOKENIZE_INLINE_CHARS is encoded here: at most
        ~0.25 ms, about what the thread hop alone costs (0.16-0.2 ms round trip, measured), which in a
        burst was most of the router's own work per request. Longer prompts and chat templates run in
        a thread, not on the loop."""
        tok = await self.tokenizer(model)
        if not messages and len(prompt) <= TOKENIZE_INLINE_CHARS:
            return list(tok.encode(prompt)), tok

        def encode() -> list[int]:
            text = tok.apply_chat_template(messages) if messages else prompt
            return list(tok.encode(text))
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, encode), tok

    async def run_tokenizer(self, fn, *args):
        """fn(*args) in the tokenize threads (sizes were checked before: it ends in bounded time)."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn, *args)

    def refused(self, method: str, _r) -> None:
        """A request refused before it was decoded (common/rpc.py add_checked_servicer): count it."""
        if method == "Generate":
            self.metrics.errors.labels("", grpc.StatusCode.INVALID_ARGUMENT.name).inc()

    # ---- Inference -----------------------------------------------------------------------------
    async def Generate(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        t0 = time.perf_counter()
        if self.draining:
            self.metrics.errors.labels(request.model, "UNAVAILABLE").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the router is shutting down; retry on another replica")
        try:   # sizes first: before model selection, tokenizing or anything else
            check_limits(request.prompt, request.messages, request.sampling, self.cfg,
                         self._limit_model_len(request.model))
        except RequestError as e:
            self.metrics.errors.labels(request.model, e.code.name).inc()
            await context.abort(e.code, e.message)
            return
        if self.pool_routing is None:   # `model` naming an adapter -> its base with adapter_id (the pool does its own)
            request = self.adapter_control.resolve_model(request)
        if self.pool_routing is not None:   # pick the model (name / capabilities / intent); may load it
            try:
                request = await self.pool_routing.route(request, context)
            except RequestError as e:
                self.metrics.errors.labels(request.model, e.code.name).inc()
                await context.abort(e.code, e.message)
                return
        try:
            with tracing.span(tracing.ROUTER_VALIDATE):
                v = validate_generate(request, self.known_models(), self.cfg.model, adapters=self.known_adapters())
                if v.request_id in self._streams:
                    raise invalid("request_id", f"{v.request_id!r} is already in flight")
            allowed = self._admission_gate(v, request.service_class, context)   # before any tokenizing
            with tracing.span(tracing.ROUTER_TOKENIZE):
                token_ids, tok = await self._encode(v.model, v.prompt, v.messages)
            if not token_ids:
                raise invalid("prompt", "tokenizes to zero tokens")
            check_prompt_tokens(len(token_ids), self.cfg, self._max_model_len(v.model))
            vocab = _vocab_size(tok)
            if vocab:
                check_stop_token_ids(v.sampling.stop_token_ids, vocab)
            breq = bus_pb2.BatchRequest(request_id=v.request_id, prompt_token_ids=token_ids, priority=v.priority,
                                        reply_subject=subjects.tokens(v.request_id), adapter_id=v.adapter_id or "")
            sampling_to_proto(v.sampling, breq.sampling)
            breq.prompt_text = v.prompt   # pass-through backends (Triton, TensorRT-LLM) take text
            # room for the deadline and the trace context set later
            check_bus_size(breq.ByteSize() + 256, self._bus_limit())
            with tracing.span(tracing.ROUTER_ROUTE):
                if v.adapter_id:   # registered but not advertised yet: wait for it (bounded)
                    await self.adapter_control.wait_served(v.model, v.adapter_id, context)
                try:
                    worker_id = await self._pick_worker(v.model, token_ids, v.adapter_id, allowed)
                except RequestError as e:
                    # The version chosen before tokenizing (which yields the event loop) may have been
                    # swapped out meanwhile: choose again among the model's served versions.
                    if e.code != grpc.StatusCode.UNAVAILABLE or self.pool_routing is None:
                        raise
                    worker_id = await self.pool_routing.reroute(v.model, token_ids, "", context, v.adapter_id)
                    if worker_id is None:
                        raise
        except RequestError as e:
            self.metrics.errors.labels(request.model, e.code.name).inc()
            await context.abort(e.code, e.message, trailing_metadata=(("retry-after-ms", str(e.retry_after_ms)),)
                                if e.retry_after_ms else ())
            return
        # the caller's tenant may run this (model, adapter, max_tokens) and it fits its quotas: else aborted
        grant = await self.tenancy.admit(context, v, len(token_ids), request.service_class)
        self.tenancy.fill(breq, grant)   # BatchRequest.tenant / tenant_weight / service_class; priority ceiling
        timer = self.metrics.request(v.model, worker_id, v.priority).start_at(t0)
        gen_span = tracing.current_span() if tracing.ENABLED else None
        if gen_span is not None:
            gen_span.set_attributes({"gen_ai.operation.name": "text_completion", "gen_ai.request.model": v.model,
                                     "gen_ai.request.max_tokens": v.sampling.max_tokens,
                                     "gen_ai.usage.input_tokens": len(token_ids), "switchyard.request_id": v.request_id,
                                     "switchyard.worker_id": worker_id, "switchyard.priority": v.priority})

        rid = v.request_id
        reply = subjects.tokens(rid)
        queue: asyncio.Queue = asyncio.Queue()

        async def on_chunk(msg) -> None:
            queue.put_nowait(msg.data)

        # Subscribe BEFORE publishing: the first chunk can never race past us.
        sub = await self.nc.subscribe(reply, cb=on_chunk)
        finished = False
        first = True
        error_code = ""
        reroutes = 0
        view = None
        held = False          # a batcher may hold the request: an early end cancels it
        attempt = 0           # BatchRequest.attempt: +1 per migration; older attempts' chunks are dropped
        streamed: list[int] = []   # token ids the client has: a migrated request resumes after them
        # Everything counted up from here is counted down in the `finally`, whatever happens.
        self.metrics.in_flight.inc()
        try:
            self._streams[rid] = (worker_id, queue)
            view = self.table.workers.get(worker_id)
            if view is not None:
                view.in_flight += 1
            remaining = context.time_remaining()
            if remaining is not None:
                breq.deadline_unix_ms = int((time.time() + remaining) * 1000)
            try:
                await self._publish_request(worker_id, breq, context)
            except nats.errors.Error as e:
                finished, error_code = True, "UNAVAILABLE"
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"NATS is down (could not send the request: "
                                                                 f"{type(e).__name__}); retry")
            held = True
            while True:
                item = await queue.get()
                cause = reason = None
                if isinstance(item, _WorkerGone):
                    if item.worker_id != worker_id:
                        continue   # about a replica this stream has left already
                    cause, reason = item.message, item.reason
                else:
                    chunk = bus_pb2.TokenChunk.FromString(item)
                    if chunk.attempt != attempt:
                        continue   # a late chunk from a replica the stream moved away from
                    if chunk.error == bus_pb2.CHUNK_ERROR_UNAVAILABLE and chunk.error_reason not in _NOT_MIGRATED \
                            and not (first and self.pool_routing is not None and reroutes < MAX_REROUTES):
                        held = False   # the batcher ended it
                        cause, reason = chunk.error_message, chunk.error_reason or "unavailable"
                if cause is not None:
                    # The replica died, hung, went silent or refused: continue on another one.
                    cause = cause.removesuffix("; retry")
                    # An external engine's pass-through batcher cannot resume from tokens: no moves there.
                    external = self.cfg.backend != "switchyard"
                    limit = 0 if external else self.cfg.migration_limit
                    target = self._migration_target(v.model, v.adapter_id, worker_id) if attempt < limit else None
                    if target is None:
                        finished, error_code = True, "UNAVAILABLE"
                        why = (f"streams on the {self.cfg.backend} backend do not migrate" if external else
                               "migration is off (migration_limit = 0)" if limit <= 0 else
                               f"it moved {attempt} time(s) already (migration_limit {limit})" if attempt >= limit
                               else f"no other live replica of model {v.model!r}")
                        await context.abort(grpc.StatusCode.UNAVAILABLE, f"{cause}; {why}; retry")
                    if held:   # a hung or silent batcher may still hold it: only that copy stops
                        await self._publish_cancel(rid, worker_id, f"migrated: {reason}")
                    attempt += 1
                    self.metrics.migrations.labels(reason).inc()
                    log.warning("request %s: %s; migrating to worker %s after %d token(s) (move %d)", rid, cause,
                                target, len(streamed), attempt)
                    if view is not None:
                        view.in_flight = max(0, view.in_flight - 1)
                    worker_id = target
                    self._streams[rid] = (worker_id, queue)
                    view = self.table.workers.get(worker_id)
                    if view is not None:
                        view.in_flight += 1
                    breq.attempt = attempt
                    del breq.resume_token_ids[:]
                    breq.resume_token_ids.extend(streamed)
                    remaining = context.time_remaining()
                    if remaining is not None:
                        breq.deadline_unix_ms = int((time.time() + remaining) * 1000)
                    held = False
                    try:
                        await self._publish_request(worker_id, breq, context)
                    except nats.errors.Error as e:
                        finished, error_code = True, "UNAVAILABLE"
                        await context.abort(grpc.StatusCode.UNAVAILABLE, f"{cause}; NATS is down too "
                                                                         f"({type(e).__name__}); retry")
                    held = True
                    continue
                if (chunk.error == bus_pb2.CHUNK_ERROR_UNAVAILABLE and first and reroutes < MAX_REROUTES
                        and self.pool_routing is not None):
                    # Refused before any token (its replica is being unloaded / swapped): go elsewhere.
                    new_worker = await self.pool_routing.reroute(v.model, token_ids, worker_id, context,
                                                                 v.adapter_id)
                    if new_worker is not None:
                        reroutes += 1
                        if view is not None:
                            view.in_flight = max(0, view.in_flight - 1)
                        worker_id = new_worker
                        self._streams[rid] = (worker_id, queue)
                        view = self.table.workers.get(worker_id)
                        if view is not None:
                            view.in_flight += 1
                        await self._publish_request(worker_id, breq, context)
                        continue
                if chunk.error:
                    finished, held = True, False  # rejected or failed: the batcher holds nothing
                    code = CHUNK_ERROR_STATUS.get(chunk.error, grpc.StatusCode.INTERNAL)
                    error_code = code.name
                    trailers = (("retry-after-ms", str(chunk.retry_after_ms or 100)),) \
                        if code == grpc.StatusCode.RESOURCE_EXHAUSTED else ()
                    await context.abort(code, chunk.error_message, trailing_metadata=trailers)
                resp = inference_pb2.GenerateResponse(request_id=rid, text=chunk.text, token_ids=chunk.token_ids,
                                                      logprobs=chunk.logprobs)
                timer.chunk()
                streamed.extend(chunk.token_ids)
                if first:
                    resp.worker_id = worker_id
                    first = False
                    grant.first_token()
                    if gen_span is not None:
                        gen_span.add_event(tracing.FIRST_TOKEN_EVENT)
                if chunk.finish_reason:
                    finished, held = True, False
                    resp.finish_reason = chunk.finish_reason
                    resp.usage.CopyFrom(chunk.usage)
                    grant.finish(chunk.usage)   # per-tenant accounting; unused quota refunded
                    reason = FINISH_FROM_PB.get(chunk.finish_reason) or "unknown"
                    timer.finish(reason, chunk.usage.completion_tokens)
                    if gen_span is not None:
                        u = chunk.usage
                        gen_span.set_attributes({"gen_ai.usage.output_tokens": u.completion_tokens,
                                                 "gen_ai.response.finish_reasons": (reason,),
                                                 "switchyard.cached_tokens": u.cached_tokens,
                                                 "switchyard.cost_usd": u.cost_usd})
                    yield resp
                    return
                yield resp
        finally:
            # Runs on normal end, abort, client cancel and deadline (the handler task is cancelled).
            grant.finish()   # no-op after a finish chunk
            self.metrics.in_flight.dec()
            if error_code:
                self.metrics.errors.labels(v.model, error_code).inc()
            elif not finished:
                remaining = context.time_remaining()
                self.metrics.errors.labels(v.model, "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0
                                           else "CANCELLED").inc()
            if view is not None:
                view.in_flight = max(0, view.in_flight - 1)
            self._streams.pop(rid, None)
            try:
                if held:   # client gone, deadline, replica lost with nowhere to go: the batcher lets go
                    await self._publish_cancel(rid)
                try:
                    await sub.unsubscribe()
                except nats.errors.Error as e:   # NATS closed under us: the subscription went with it
                    log.debug("unsubscribe %s: %r", reply, e)
            finally:
                self._stream_ended.fire()   # drain() waits for the last one

    async def _publish_request(self, worker_id: str, breq: bus_pb2.BatchRequest, context) -> None:
        """Publish on sy.req.<worker> with the trace context (a NATS PRODUCER span when tracing)."""
        subject = subjects.request(worker_id)
        view = self.table.workers.get(worker_id)
        if view is not None:
            view.sent_since_beat += 1   # the admission gate's count of arrivals since its heartbeat
        if not tracing.ENABLED:
            # No tracing here: still pass a client's traceparent on, for tracing further down.
            traceparent = _metadata(context, "traceparent")
            if traceparent:
                breq.traceparent = traceparent
            await self.nc.publish(subject, breq.SerializeToString(),
                                  headers={"traceparent": traceparent} if traceparent else None)
            return
        from opentelemetry.trace import SpanKind
        with tracing.tracer.start_as_current_span(tracing.ROUTER_PUBLISH, kind=SpanKind.PRODUCER, attributes={
                "messaging.system": "nats", "messaging.operation.type": "send",
                "messaging.destination.name": subject, "messaging.message.id": breq.request_id}) as span:
            headers = propagation.nats_headers(span)
            if headers:
                breq.traceparent = headers[propagation.TRACEPARENT]
            await self.nc.publish(subject, breq.SerializeToString(), headers=headers)

    async def ListModels(self, request, context) -> inference_pb2.ListModelsResponse:
        if self.pool_routing is not None:   # the pool knows every catalogue model, loaded or not
            try:
                return await self.pool_routing.list_models()
            except RequestError as e:
                await context.abort(e.code, e.message)
        by_model = self.table.models()
        resp = inference_pb2.ListModelsResponse()
        for name in self.known_models():
            ws = by_model.get(name, [])
            # USD per GPU-hour of one worker of it (the configured price; the mean when they differ)
            prices = [self.cfg.gpu_price(w.worker_id) for w in ws] or [self.cfg.gpu_usd_per_hour]
            resp.models.add(name=name, num_workers=len(ws),
                            max_model_len=min((w.heartbeat.max_model_len for w in ws), default=0),
                            state="ready" if ws else "unloaded", replicas=len(ws), desired_replicas=len(ws),
                            queue_depth=sum(w.reported_load for w in ws), workers=sorted(w.worker_id for w in ws),
                            gpu_usd_per_hour=sum(prices) / len(prices))
        return resp

    async def ListAdapters(self, request: inference_pb2.ListAdaptersRequest,
                           context) -> inference_pb2.ListAdaptersResponse:
        return self.adapter_control.list_adapters(request.base_model)

    async def Tokenize(self, request: inference_pb2.TokenizeRequest, context) -> inference_pb2.TokenizeResponse:
        try:
            from router.validation import resolve_model
            model = resolve_model(request.model, "", self.known_models(), self.cfg.model)
            messages = check_input(request.prompt, request.messages)
            check_limits(request.prompt, request.messages, common_pb2.SamplingParams(), self.cfg,
                         self._limit_model_len(model))
            ids, _ = await self._encode(model, request.prompt, messages)
        except RequestError as e:
            await context.abort(e.code, e.message)
            return
        return inference_pb2.TokenizeResponse(token_ids=ids, count=len(ids))

    async def Embed(self, request: inference_pb2.EmbedRequest, context) -> inference_pb2.EmbedResponse:
        # validation, tokenizing, routing to an embedding batcher: router/embeddings.py
        from router.embeddings import embed
        return await embed(self, request, context)

    # ---- Admin ---------------------------------------------------------------------------------
    async def LoadModel(self, request, context):
        return await self._pool_admin("LoadModel", request, context)

    async def UnloadModel(self, request, context):
        return await self._pool_admin("UnloadModel", request, context)

    async def LoadAdapter(self, request, context) -> inference_pb2.LoadAdapterResponse:
        return await self._adapter_admin(self.adapter_control.load, request, context)

    async def UnloadAdapter(self, request, context) -> inference_pb2.UnloadAdapterResponse:
        return await self._adapter_admin(self.adapter_control.unload, request, context)

    async def _adapter_admin(self, call, request, context):
        try:
            return await call(request, context)   # checks the admin token first
        except RequestError as e:
            await context.abort(e.code, e.message)

    async def _pool_admin(self, method: str, request, context):
        """Admin token check, then forward to the launcher's model pool (services/pool.py)."""
        from router.admin_auth import check_admin
        try:
            check_admin(context, self.cfg)
            if self.pool_routing is None:
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                   "no model pool here: start the stack with `switchyard up --pool switchyard.toml`")
            return await self.pool_routing.admin(method, request, context)
        except RequestError as e:
            await context.abort(e.code, e.message)

    async def TenantUsage(self, request, context) -> inference_pb2.TenantUsageResponse:
        return await self.tenancy.tenant_usage(request, context)   # router/tenancy.py

    async def Status(self, request, context) -> kv_index_pb2.StatusResponse:
        """The workers as this router sees them, plus the KV index's block counts (best effort)."""
        indexed: dict[str, int] = {}
        total = 0
        if self.kv is not None:
            try:
                kv_status = await self.kv.Status(kv_index_pb2.StatusRequest(), timeout=1.0)
                indexed = {w.worker_id: w.indexed_blocks for w in kv_status.workers}
                total = kv_status.indexed_blocks_total
            except grpc.aio.AioRpcError:
                pass
        return kv_index_pb2.StatusResponse(indexed_blocks_total=total, workers=self.table.status(indexed))


def _vocab_size(tok) -> int:
    try:
        return int(getattr(tok, "vocab_size", 0) or len(tok))
    except (TypeError, ValueError):
        return 0


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str:
    for k, val in context.invocation_metadata() or ():
        if k == key:
            return val if isinstance(val, str) else val.decode()
    return ""
