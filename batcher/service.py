"""The batcher: one per worker. NATS in (requests, cancels), Worker/Step out, NATS out (tokens).

Loop, per engine step:  plan = core.schedule(); send it; outputs = core.process(result); one
TokenChunk per request; one KvEventBatch for the step. With `step_pipeline` the next plan is
scheduled and sent while the worker still runs the current one (batcher/step_timing.py says
when), so the worker goes from step to step without waiting for this process.
Requests are admitted (or rejected) in the NATS callback the moment they arrive, so a full queue
is answered at once. Cancels are applied between steps, never while a plan is on the wire.
When there is no work the loop sleeps on an event (no polling).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass

import grpc
import nats

from batcher.adapters import BatcherAdapters
from batcher.admission_window import AdmissionWindow
from batcher.engine_core import EngineCore, RequestOutput
from batcher.scheduler import QueueFullError, Scheduler
from batcher.step_timing import StepTimer
from kv_manager.block_allocator import BlockAllocator
from kv_manager.events import CLEARED, KvEvent
from protos.switchyard.v1 import bus_pb2, worker_pb2, worker_pb2_grpc
from services import rpc, subjects
from services.bus_codec import FINISH_TO_PB, kv_events_to_proto
from services.config import StackConfig
from telemetry import tracing
from telemetry.metrics import BatcherMetrics
from workers.engine.errors import InvalidRequestError, UnknownAdapterError
from workers.engine.plan import StepPlan, StepResult
from workers.step_codec import plan_to_proto, result_from_proto, sampling_from_proto

log = logging.getLogger("switchyard.batcher")


_REJECT_REASONS = {bus_pb2.CHUNK_ERROR_QUEUE_FULL: "queue_full", bus_pb2.CHUNK_ERROR_INVALID: "invalid",
                   bus_pb2.CHUNK_ERROR_UNAVAILABLE: "unavailable", bus_pb2.CHUNK_ERROR_INTERNAL: "internal"}


class WorkerLostError(RuntimeError):
    """The Step stream broke: the worker died or restarted."""


class RemoteRunner:
    def __init__(self, channel: grpc.aio.Channel):
        self._stub = worker_pb2_grpc.WorkerStub(channel)
        self._call = None

    async def info(self, timeout: float = 2.0) -> worker_pb2.WorkerInfo:
        return await self._stub.Health(worker_pb2.HealthRequest(), timeout=timeout)

    def open(self) -> None:
        # No request iterator: write()/read() on the call, one plan out and one result in per step.
        self._call = self._stub.Step()

    async def send(self, plan: StepPlan, trace: tuple[str, list[str]] | None = None) -> None:
        """Queue a plan on the Step stream; results come back in plan order (`receive`)."""
        call = self._call
        if call is None:
            raise WorkerLostError("no Step stream open")
        pb = plan_to_proto(plan)
        if trace is not None and trace[0]:   # tracing: the worker.step span's parent and links
            pb.traceparent = trace[0]
            pb.links.extend(trace[1])
        try:
            await call.write(pb)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError) as e:
            self._call = None
            raise WorkerLostError(f"worker Step stream failed: {e}") from e

    async def receive(self) -> StepResult:
        call = self._call
        if call is None:
            raise WorkerLostError("no Step stream open")
        try:
            pb = await call.read()
        except (grpc.aio.AioRpcError, grpc.aio.UsageError) as e:
            self._call = None
            raise WorkerLostError(f"worker Step stream failed: {e}") from e
        if pb is grpc.aio.EOF:
            self._call = None
            raise WorkerLostError("worker closed the Step stream")
        return result_from_proto(pb)

    async def execute(self, plan: StepPlan, trace: tuple[str, list[str]] | None = None) -> StepResult:
        await self.send(plan, trace)
        return await self.receive()

    def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None


@dataclass
class _InFlight:
    plan: StepPlan
    started: float        # perf_counter when the worker (probably) started it


class BatcherService:
    def __init__(self, cfg: StackConfig, worker_id: str, worker_addr: str, nc: nats.NATS, tokenizer_loader=None,
                 metrics: BatcherMetrics | None = None):
        self.cfg = cfg
        self.worker_id = subjects.check_token(worker_id, "worker id")
        if metrics is None:  # not served: a private registry
            from prometheus_client import CollectorRegistry
            metrics = BatcherMetrics(cfg.model, worker_id, cfg.gpu_usd_per_hour, CollectorRegistry())
        self.metrics = metrics
        self._priority: dict[str, int] = {}       # request id -> priority (metric label)
        self._cost_base: dict[str, float] = {}    # request id -> CostMeter base at its first token
        self._spans = None
        if tracing.ENABLED:
            from telemetry.request_spans import BatcherSpans
            self._spans = BatcherSpans(self.worker_id)
        self.worker_addr = worker_addr
        self.nc = nc
        self._load_tokenizer = tokenizer_loader
        self._channel = rpc.channel(worker_addr, cfg.max_message_bytes)
        self.remote = RemoteRunner(self._channel)
        # LoRA adapters admitted and advertised (the worker's list, changed at run time by ModelControl)
        self.adapters = BatcherAdapters(self.worker_id, self._channel, self._adapter_in_use, self._publish_heartbeat)
        self.core: EngineCore | None = None
        self.model = ""
        self.info = None
        self.healthy = False
        self.draining = False
        self.unloaded = False                     # ModelControl "unload": not routable, requests rejected
        self._reply: dict[str, str] = {}          # request id -> reply subject
        self._aborts: list[str] = []
        self._kv_events: list[KvEvent] = []
        self._kv_seq = 0
        self._hb_seq = 0
        self._wake = asyncio.Event()
        self._timer = StepTimer()
        self._window = AdmissionWindow(cfg.admission_window_ms / 1000)
        self._tasks: list[asyncio.Task] = []
        self._subs = []
        self._tokenizer = None

    # ---- start / stop ----------------------------------------------------------------------
    async def start(self, ready_timeout: float = 300.0) -> None:
        await self._connect_worker(ready_timeout)
        self._subs.append(await self.nc.subscribe(subjects.request(self.worker_id), cb=self._on_request))
        self._subs.append(await self.nc.subscribe(subjects.ALL_CANCELS, cb=self._on_cancel))
        self._subs.append(await self.nc.subscribe(subjects.control(self.worker_id), cb=self._on_control))
        self._tasks = [asyncio.create_task(self._run(), name="batcher-loop"),
                       asyncio.create_task(self._heartbeat_loop(), name="batcher-heartbeat")]
        await self._publish_heartbeat()

    async def _connect_worker(self, timeout: float) -> None:
        """Wait for the worker to be ready, then size the allocator from its KV cache and open Step."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = await self.remote.info(timeout=2.0)
                if info.ready:
                    break
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {self.worker_id} at {self.worker_addr} not ready after {timeout:.0f}s")
            await asyncio.sleep(0.2)
        self.info = info
        if self._tokenizer is None or info.model != self.model:
            loader = self._load_tokenizer
            if loader is None:
                from services.tokenizers import load_tokenizer as loader
            self._tokenizer = await asyncio.get_running_loop().run_in_executor(None, loader, info.model)
        self.model = info.model
        self.adapters.reset(info.adapters)   # after a worker restart: its start-up adapters only
        self.metrics.relabel(info.model)
        self.metrics.reset_totals()   # a fresh core counts its totals from zero
        cfg = self.cfg
        allocator = BlockAllocator(info.num_blocks, info.block_size,
                                   enable_prefix_caching=cfg.enable_prefix_caching)
        scheduler = Scheduler(allocator, max_num_seqs=cfg.max_num_seqs,
                              max_num_batched_tokens=cfg.max_num_batched_tokens,
                              max_model_len=info.max_model_len, max_waiting=cfg.max_waiting,
                              max_loras=cfg.max_loras)
        self.core = EngineCore(scheduler, None, self._tokenizer)
        self.core.adapter_check = self.adapters.check
        self.core.set_kv_event_callback(self._on_kv_event)
        # A fresh allocator: whatever the index believed about this worker is gone.
        self._kv_events.append(KvEvent(CLEARED, [], block_size=info.block_size))
        self.remote.open()
        self.healthy = True

    def _on_kv_event(self, event: KvEvent) -> None:
        # Not a bound list.append: _flush_kv_events swaps the list out.
        self._kv_events.append(event)

    async def drain(self, grace: float) -> None:
        """Stop admitting, let running requests finish (up to grace seconds), abort the rest."""
        self.draining = True
        await self._publish_heartbeat()
        deadline = time.monotonic() + grace
        while self._reply and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for rid in list(self._reply):
            self._aborts.append(rid)
        self._wake.set()
        await asyncio.sleep(0.1)

    async def stop(self) -> None:
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:
                pass
        await self.adapters.stop()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        self.remote.close()
        await self._channel.close()

    # ---- NATS callbacks ----------------------------------------------------------------------
    async def _on_request(self, msg) -> None:
        req = bus_pb2.BatchRequest.FromString(msg.data)
        reply = req.reply_subject or subjects.tokens(req.request_id)
        span = self._spans.receive(msg, req) if self._spans is not None else None
        if not self.healthy or self.draining or self.core is None or self.unloaded:
            why = "draining" if self.draining else "unloaded" if self.unloaded else "its worker is not available"
            await self._reject(reply, req.request_id, bus_pb2.CHUNK_ERROR_UNAVAILABLE,
                               f"worker {self.worker_id} is {why}; retry", span=span)
            return
        if req.deadline_unix_ms and req.deadline_unix_ms <= time.time() * 1000:
            await self._reject(reply, req.request_id, bus_pb2.CHUNK_ERROR_UNAVAILABLE, "deadline already passed",
                               reason="deadline", span=span)
            return
        try:
            self.core.add_request(req.request_id, list(req.prompt_token_ids), sampling_from_proto(req.sampling),
                                  priority=req.priority, adapter_id=req.adapter_id or None)
        except QueueFullError as e:
            await self._reject(reply, req.request_id, bus_pb2.CHUNK_ERROR_QUEUE_FULL, str(e),
                               retry_after_ms=e.retry_after_ms, span=span)
            return
        except InvalidRequestError as e:
            await self._reject(reply, req.request_id, bus_pb2.CHUNK_ERROR_INVALID, str(e), field=e.field, span=span)
            return
        except UnknownAdapterError as e:
            await self._reject(reply, req.request_id, bus_pb2.CHUNK_ERROR_NOT_FOUND, str(e), field="adapter_id",
                               reason="not_found", span=span)
            return
        self._reply[req.request_id] = reply
        self._priority[req.request_id] = req.priority
        if span is not None:
            self._spans.admitted(span, req.request_id, self.model, len(req.prompt_token_ids))
        self._wake.set()

    async def _on_control(self, msg) -> None:
        """Model load/unload (Triton front door's repository API). Unload stops serving; the worker keeps
        its weights resident until the model pool can free them. LoRA adapter load/unload: batcher/adapters.py."""
        ctl = bus_pb2.ModelControl.FromString(msg.data)
        if ctl.action in ("load_adapter", "unload_adapter"):
            async def answer(out: bus_pb2.ModelControlReply) -> None:
                if msg.reply:
                    await self.nc.publish(msg.reply, out.SerializeToString())
            self.adapters.handle(ctl, answer)
            return
        ok = ctl.action in ("load", "unload") and (not ctl.model or ctl.model == self.model)
        if ok:
            self.unloaded = ctl.action == "unload"
            await self._publish_heartbeat()
        err = "" if ok else f"cannot {ctl.action!r} model {ctl.model!r} on worker {self.worker_id} ({self.model!r})"
        if msg.reply:
            await self.nc.publish(msg.reply, bus_pb2.ModelControlReply(ok=ok, error=err).SerializeToString())

    async def _on_cancel(self, msg) -> None:
        rid = subjects.last_token(msg.subject)
        if rid in self._reply:  # every batcher hears every cancel; only the owner acts
            self._aborts.append(rid)
            self._wake.set()

    async def _reject(self, reply: str, rid: str, error: int, message: str, *, retry_after_ms: int = 0,
                      field: str = "", reason: str = "", span=None) -> None:
        reason = reason or _REJECT_REASONS.get(error, "internal")
        self.metrics.reject(reason)
        if span is not None:
            self._spans.rejected(span, reason, message)
        chunk = bus_pb2.TokenChunk(request_id=rid, error=error, error_message=message,
                                   retry_after_ms=retry_after_ms, error_field=field)
        await self.nc.publish(reply, chunk.SerializeToString())

    # ---- the step loop -------------------------------------------------------------------------
    async def _run(self) -> None:
        chunks: list[tuple[str, bytes]] = []   # the last result's chunks, published while the worker computes
        inflight: deque[_InFlight] = deque()    # plans at the worker, oldest first (at most two)
        reading: asyncio.Future | None = None   # the read of the oldest plan's result
        while True:
            core = self.core
            if core is None or not self.healthy:
                if reading is not None:
                    reading.cancel()
                reading = None
                inflight.clear()
                await self._publish_step(chunks)
                chunks = []
                await self._reconnect()
                continue
            self._apply_aborts()
            if not inflight:
                # Nothing queued at the worker (a step whose shape the timer could not predict, e.g.
                # after a prefill): the tokens go out before the next plan is made, because they
                # include first tokens. A queued plan keeps the worker busy otherwise.
                await self._publish_step(chunks)
                chunks = []
                if not core.has_unfinished():
                    self._wake.clear()
                    await self._wake.wait()
                    await self._window.gather(self._wake)
                    continue
                plan = core.schedule()
                if plan.is_empty and not plan.finished_ids:
                    # Waiting work that cannot be scheduled yet: wait for a change instead of spinning.
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout=0.05)
                    except asyncio.TimeoutError:
                        pass
                    continue
                await self._send(plan, inflight)
            # A plan is at the worker: publish the previous step's tokens while it computes, so NATS
            # and the router's relay stay off the step's critical path.
            await self._publish_step(chunks)
            chunks = []
            if reading is None:
                reading = asyncio.ensure_future(self.remote.receive())
            if self.cfg.step_pipeline and len(inflight) == 1:
                # Plan the next step while this one runs; send it just before this one should end
                # (batcher/step_timing.py), so requests arriving meanwhile still join it.
                head = inflight[0]
                at = self._timer.send_next_at(head.started, head.plan.num_tokens)
                if at is not None:
                    delay = at - time.perf_counter()
                    if delay > 0:
                        await asyncio.wait({reading}, timeout=delay)
                    if not reading.done():
                        self._apply_aborts()
                        if core.has_unfinished():
                            plan = core.schedule()
                            if not (plan.is_empty and not plan.finished_ids):
                                await self._send(plan, inflight)
            try:
                result = await reading
            except WorkerLostError as e:
                reading = None
                inflight.clear()
                await self._on_worker_lost(str(e))
                continue
            reading = None
            now = time.perf_counter()
            head = inflight.popleft()
            if inflight:   # the queued plan started when this result left the worker
                inflight[0].started = now
            self._timer.observe(head.plan.num_tokens, result.execute_ms / 1000)
            self.metrics.step(now - head.started, head.plan.num_tokens)
            chunks = self._encode_outputs(core.process(result))

    async def _send(self, plan: StepPlan, inflight: deque[_InFlight]) -> None:
        trace = self._spans.step_context(plan) if self._spans is not None and self._spans.reqs else None
        inflight.append(_InFlight(plan, time.perf_counter()))
        try:
            await self.remote.send(plan, trace)
        except WorkerLostError:
            pass   # the pending read fails the same way and handles it

    async def _publish_step(self, chunks: list[tuple[str, bytes]]) -> None:
        publish = self.nc.publish
        for subject, data in chunks:
            await publish(subject, data)
        await self._flush_kv_events()

    def _apply_aborts(self) -> None:
        if not self._aborts or self.core is None:
            return
        aborts, self._aborts = self._aborts, []
        for rid in aborts:
            if self._reply.pop(rid, None) is not None:
                self.core.abort(rid)
                self._priority.pop(rid, None)
                self._cost_base.pop(rid, None)
                if self._spans is not None:
                    self._spans.abort(rid)

    def _encode_outputs(self, outputs: list[RequestOutput]) -> list[tuple[str, bytes]]:
        """One TokenChunk per request that produced tokens this step, with usage, cost, metrics
        and spans settled now (at the step's end); only the sending is deferred."""
        chunks: list[tuple[str, bytes]] = []
        reply = self._reply
        cost = self.metrics.cost
        spans = self._spans if self._spans is not None and self._spans.reqs else None
        for o in outputs:
            subject = reply.get(o.request_id)
            if subject is None:
                continue
            if o.num_output_tokens == 1:   # its first token: the cost share starts here
                self._cost_base[o.request_id] = cost.first_token_base(o.num_prompt_tokens - o.num_cached_tokens)
            chunk = bus_pb2.TokenChunk(request_id=o.request_id, token_ids=o.new_token_ids, text=o.new_text)
            if o.logprobs:
                chunk.logprobs.extend(o.logprobs)
            if o.finished:
                del reply[o.request_id]
                chunk.finish_reason = FINISH_TO_PB.get(o.finish_reason, 0)
                u = chunk.usage
                u.prompt_tokens = o.num_prompt_tokens
                u.completion_tokens = o.num_output_tokens
                u.cached_tokens = o.num_cached_tokens
                u.queue_ms = o.queue_ms
                u.prefill_ms = o.prefill_ms
                u.decode_ms = o.decode_ms
                u.worker_id = self.worker_id
                base = self._cost_base.pop(o.request_id, None)
                u.cost_usd = cost.integral - base if base is not None else 0.0
                self.metrics.request_finished(self._priority.pop(o.request_id, 0), o.finish_reason, o.queue_ms,
                                              o.prefill_ms, o.decode_ms)
                if spans is not None:
                    spans.output(o, u.cost_usd)
            elif spans is not None:
                spans.output(o)
            chunks.append((subject, chunk.SerializeToString()))
        return chunks

    async def _flush_kv_events(self) -> None:
        if not self._kv_events:
            return
        events, self._kv_events = self._kv_events, []
        self._kv_seq += 1
        batch = kv_events_to_proto(self.worker_id, self._kv_seq, events)
        await self.nc.publish(subjects.kv_events(self.worker_id), batch.SerializeToString())

    async def _on_worker_lost(self, why: str) -> None:
        """Fail every in-flight request with UNAVAILABLE at once; then try to reconnect."""
        log.error("worker %s lost: %s", self.worker_id, why)
        self.healthy = False
        self.core = None
        await self._publish_heartbeat()
        for rid, reply in list(self._reply.items()):
            await self._reject(reply, rid, bus_pb2.CHUNK_ERROR_UNAVAILABLE,
                               f"worker {self.worker_id} failed mid-request ({why}); retry", reason="worker_lost")
        self._reply.clear()
        self._aborts.clear()
        self._priority.clear()
        self._cost_base.clear()
        if self._spans is not None:
            self._spans.fail_all(f"worker lost: {why}")
        self._kv_events = [KvEvent(CLEARED, [], block_size=self.info.block_size if self.info else 0)]
        await self._flush_kv_events()

    async def _reconnect(self) -> None:
        try:
            await self._connect_worker(timeout=1.0)
            log.warning("worker %s reconnected", self.worker_id)
        except (TimeoutError, grpc.aio.AioRpcError):
            await asyncio.sleep(1.0)

    # ---- heartbeat ---------------------------------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat_interval_s)
            try:
                await self._publish_heartbeat()
            except Exception:  # NATS reconnecting: the next beat will do
                log.debug("heartbeat failed", exc_info=True)

    def heartbeat(self) -> bus_pb2.Heartbeat:
        self._hb_seq += 1
        hb = bus_pb2.Heartbeat(worker_id=self.worker_id, model=self.model, healthy=self.healthy and not self.unloaded,
                               draining=self.draining, seq=self._hb_seq,
                               interval_ms=int(self.cfg.heartbeat_interval_s * 1000))
        if self.info is not None:
            hb.block_size = self.info.block_size
            hb.max_model_len = self.info.max_model_len
            hb.num_blocks = self.info.num_blocks
            hb.adapters.extend(self.adapters.advertised())
        if self.core is not None:
            s = self.core.stats()
            hb.num_running = s.num_running
            hb.num_waiting = s.num_waiting
            hb.kv_usage = s.kv_usage
            hb.num_free_blocks = s.num_free_blocks
            hb.num_blocks = s.num_blocks
            hb.prefix_cache_hit_rate = s.prefix_cache_hit_rate
            hb.num_preemptions = s.num_preemptions
            hb.prompt_tokens_total = s.prompt_tokens_total
            hb.generation_tokens_total = s.generation_tokens_total
            self.metrics.update_from_stats(s)
        return hb

    def _adapter_in_use(self, adapter_id: str) -> int:
        """Accepted requests (waiting or running) for an adapter; only polled while it is unloaded."""
        core = self.core
        if core is None:   # worker lost: its requests were failed already
            return 0
        return sum(1 for r in core.scheduler.requests.values() if r.adapter_id == adapter_id)

    async def _publish_heartbeat(self) -> None:
        await self.nc.publish(subjects.heartbeat(self.worker_id), self.heartbeat().SerializeToString())
