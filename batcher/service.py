"""The batcher: one per worker. NATS in (requests, cancels), Worker/Step out, NATS out (tokens).

Loop, per engine step:  plan = core.schedule(); send it; outputs = core.process(result); one
TokenChunk per request; one KvEventBatch for the step. With `step_pipeline` the next plan is
scheduled and sent while the worker still runs the current one (batcher/step_timing.py says
when), so the worker goes from step to step without waiting for this process.
The NATS side (admission and rejects, cancels, ModelControl, heartbeats, KV events, drain) is
batcher/nats_edge.py, shared with the pass-through batcher; this class is its host. Requests are
admitted (or rejected) in the NATS callback the moment they arrive, so a full queue is answered at
once. Cancels are applied between steps, never while a plan is on the wire, and each one's future
resolves when it has been applied. When there is no work the loop sleeps on an event (no polling).
"""
from __future__ import annotations

import asyncio
import heapq
import logging
import os
import time
from collections import deque
from dataclasses import dataclass

import grpc
import nats
from grpc_health.v1 import health_pb2, health_pb2_grpc

from batcher.adapters import BatcherAdapters
from batcher.admission_window import AdmissionWindow
from batcher.engine_core import EngineCore, RequestOutput, build_engine_core
from batcher.liveness import EXIT_WORKER_HUNG, HUNG_GRACE_S, StepWatch
from batcher.nats_edge import NatsEdge
from batcher.step_timing import StepTimer
from common import rpc, subjects
from common.bus_codec import FINISH_TO_PB
from common.config import StackConfig
from common.waiting import wait_set
from kv_manager.events import CLEARED, KvEvent
from protos.switchyard.v1 import bus_pb2, worker_pb2, worker_pb2_grpc
from telemetry import tracing
from telemetry.metrics import BatcherMetrics
from workers.engine.plan import StepPlan, StepResult
from workers.step_codec import plan_to_proto, result_from_proto, sampling_from_proto

log = logging.getLogger("switchyard.batcher")

WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name   # its health status name
RECONNECT_BACKOFF_S = 1.0    # after a failed reconnect, before the next


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
            raise WorkerLostError(f"worker Step stream failed: {rpc.describe(e)}") from e

    async def receive(self) -> StepResult:
        call = self._call
        if call is None:
            raise WorkerLostError("no Step stream open")
        try:
            pb = await call.read()
        except (grpc.aio.AioRpcError, grpc.aio.UsageError) as e:
            self._call = None
            raise WorkerLostError(f"worker Step stream failed: {rpc.describe(e)}") from e
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
        # The NATS side: requests, cancels, control, heartbeats, KV events, drain (batcher/nats_edge.py).
        self.edge = NatsEdge(nc, self.worker_id, self, heartbeat_interval_s=cfg.heartbeat_interval_s,
                             metrics=self.metrics, spans=self._spans)
        self._load_tokenizer = tokenizer_loader
        self._channel = rpc.channel(worker_addr, cfg.max_message_bytes)
        self.remote = RemoteRunner(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        # LoRA adapters admitted and advertised (the worker's list, changed at run time by ModelControl)
        self.adapters = BatcherAdapters(self.worker_id, self._channel, self._adapter_in_use,
                                        self.edge.publish_heartbeat)
        self.core: EngineCore | None = None
        self.model = ""
        self.info = None
        self.healthy = False
        self._aborts: dict[str, asyncio.Future] = {}   # cancels for the step loop; resolved once applied
        self._kv_events: list[KvEvent] = []
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._timer = StepTimer()
        # liveness: a step past its budget means a hung worker (batcher/liveness.py)
        self._watch = StepWatch(self._timer, cfg.step_timeout_factor, cfg.step_timeout_floor_s,
                                cfg.step_timeout_cold_s)
        self.unhealthy_reason = ""
        # called once a hung worker's streams are failed: the process exits so the launcher restarts
        # the pair (the worker cannot be trusted to come back, and its Step call cannot be ended)
        self.on_hung = lambda: os._exit(EXIT_WORKER_HUNG)
        self._attempts: dict[str, int] = {}          # request id -> BatchRequest.attempt, when not 0
        self._deadlines: list[tuple[float, str]] = []   # (deadline unix ms, request id), a heap
        self._window = AdmissionWindow(cfg.admission_window_ms / 1000)
        self._tasks: list[asyncio.Task] = []
        self._tokenizer = None
        self._speculative = False

    # ---- start / stop ----------------------------------------------------------------------
    @property
    def draining(self) -> bool:
        return self.edge.draining

    @property
    def unloaded(self) -> bool:
        return self.edge.unloaded

    async def start(self, ready_timeout: float = 300.0) -> None:
        await self._connect_worker(ready_timeout)
        await self.start_serving()

    async def start_serving(self) -> None:
        """The step loop and the NATS edge, once a worker is connected (`core` and `remote` set)."""
        self._tasks = [asyncio.create_task(self._run(), name="batcher-loop")]
        await self.edge.start()

    async def _worker_serving(self, timeout: float | None) -> None:
        """Until the worker's grpc.health.v1 status is SERVING (set once its model is loaded and warm).
        A Watch stream: the change arrives when it happens; a worker not listening yet (or restarting)
        is waited for by the channel (wait_for_ready). TimeoutError after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        req = health_pb2.HealthCheckRequest(service=WORKER_SERVICE)
        while True:
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                raise TimeoutError(f"worker {self.worker_id} at {self.worker_addr} not ready after {timeout:.0f}s")
            call = self._health.Watch(req, timeout=left, wait_for_ready=True)
            try:
                async for status in call:
                    if status.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue   # the deadline check above answers
                if e.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND):
                    raise   # not a Switchyard worker: waiting will not help
                log.debug("worker %s health watch: %s; watching again", self.worker_id, e.code())
            finally:
                call.cancel()

    async def _connect_worker(self, timeout: float | None) -> None:
        """Wait for the worker to be ready, then size the allocator from its KV cache and open Step."""
        await self._worker_serving(timeout)
        info = await self.remote.info(timeout=5.0)
        self.info = info
        if self._tokenizer is None or info.model != self.model:
            loader = self._load_tokenizer
            if loader is None:
                from common.tokenizers import load_tokenizer as loader
            self._tokenizer = await asyncio.get_running_loop().run_in_executor(None, loader, info.model)
        self.model = info.model
        self.adapters.reset(info.adapters)   # after a worker restart: its start-up adapters only
        self.metrics.relabel(info.model)
        self.metrics.reset_totals()   # a fresh core counts its totals from zero
        # The worker's engine settings (the same [engine] table) and its KV cache's geometry.
        self.core = build_engine_core(self.cfg.engine, num_blocks=info.num_blocks, block_size=info.block_size,
                                      max_model_len=info.max_model_len, runner=None, tokenizer=self._tokenizer)
        self.core.adapter_check = self.adapters.check
        # speculative decoding configured (batcher/spec_policy.py decides per request per step)
        self._speculative = self.cfg.engine.speculative_method != "off" and hasattr(self.core, "spec_totals")
        self.core.scheduler.max_queue_delay_s = self.cfg.max_queue_delay_ms / 1000   # honest admission
        self.core.set_kv_event_callback(self._on_kv_event)
        # A fresh allocator: whatever the index believed about this worker is gone.
        self._kv_events.append(KvEvent(CLEARED, [], block_size=info.block_size))
        self.remote.open()
        self.healthy = True

    def _on_kv_event(self, event: KvEvent) -> None:
        # Not a bound list.append: _flush_kv_events swaps the list out.
        self._kv_events.append(event)

    async def drain(self, grace: float) -> None:
        """Stop admitting, let running requests finish (up to grace seconds), abort the rest
        (returns once the step loop has applied those aborts)."""
        await self.edge.drain(grace)

    async def stop(self) -> None:
        self._stop.set()
        await self.edge.stop()
        await self.adapters.stop()
        for t in self._tasks:
            t.cancel()
        for t, out in zip(self._tasks, await asyncio.gather(*self._tasks, return_exceptions=True)):
            if isinstance(out, Exception):
                log.error("batcher task %s had failed: %r", t.get_name(), out, exc_info=out)
        for fut in self._aborts.values():
            fut.cancel()
        self._aborts.clear()
        self.remote.close()
        await self._channel.close()

    # ---- the edge's host (batcher/nats_edge.py) ----------------------------------------------
    def unavailable_reason(self) -> str:
        return "its worker is not available"

    def admit(self, req: bus_pb2.BatchRequest, reply: str) -> None:
        """Validate and queue (EngineError: nothing queued); the step loop takes it from here."""
        core = self.core
        if core is None:   # the edge admits only while healthy, and a lost worker clears both
            raise RuntimeError(f"worker {self.worker_id}: admit without an engine core")
        core.add_request(req.request_id, list(req.prompt_token_ids), sampling_from_proto(req.sampling),
                         priority=req.priority, adapter_id=req.adapter_id or None,
                         resume_token_ids=list(req.resume_token_ids) or None, tenant=req.tenant,
                         tenant_weight=req.tenant_weight, service_class=req.service_class,
                         deadline_unix_ms=req.deadline_unix_ms)
        self._priority[req.request_id] = req.priority
        if req.attempt:
            self._attempts[req.request_id] = req.attempt
        if req.deadline_unix_ms:
            heapq.heappush(self._deadlines, (req.deadline_unix_ms, req.request_id))
            # wake the loop when it passes, should it be waiting for work then
            asyncio.get_running_loop().call_later(max(0.0, req.deadline_unix_ms / 1000 - time.time()) + 0.01,
                                                  self._wake.set)
        self._wake.set()

    def cancel(self, request_id: str) -> asyncio.Future:
        """Queue an abort for the step loop, which applies it between steps; the future resolves then."""
        fut = self._aborts.get(request_id)
        if fut is None:
            fut = self._aborts[request_id] = asyncio.get_running_loop().create_future()
            self._wake.set()
        return fut

    async def control(self, ctl: bus_pb2.ModelControl) -> bus_pb2.ModelControlReply | asyncio.Future:
        """Model load/unload (Triton front door's repository API, the model pool). Unload stops serving;
        the worker keeps its weights resident until the model pool can free them. LoRA adapter
        load/unload go on in the background (batcher/adapters.py)."""
        if ctl.action in ("load_adapter", "unload_adapter"):
            return self.adapters.start(ctl)
        ok = ctl.action in ("load", "unload") and (not ctl.model or ctl.model == self.model)
        if ok:
            self.edge.unloaded = ctl.action == "unload"
            await self.edge.publish_heartbeat()
        err = "" if ok else f"cannot {ctl.action!r} model {ctl.model!r} on worker {self.worker_id} ({self.model!r})"
        return bus_pb2.ModelControlReply(ok=ok, error=err)

    async def before_heartbeat(self) -> None:
        pass   # the worker's health shows in the Step stream, not here

    # ---- the step loop -------------------------------------------------------------------------
    async def _run(self) -> None:
        chunks: list[tuple[str, bytes, str | None]] = []   # the last result's chunks, sent while the worker computes
        inflight: deque[_InFlight] = deque()    # plans at the worker, oldest first (at most two)
        reading: asyncio.Future | None = None   # the read of the oldest plan's result
        while not self._stop.is_set():
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
            for req in core.scheduler.expired_waiting():   # still queued at its deadline (batcher/scheduler.py)
                await self.edge.fail(req.request_id, bus_pb2.CHUNK_ERROR_DEADLINE, "deadline passed while queued",
                                     reason="deadline", attempt=self._attempts.get(req.request_id, 0))
                self.cancel(req.request_id)   # _apply_aborts below frees it like any cancel
            for req, retry_ms in core.scheduler.hopeless_waiting():   # would miss its deadline: say so now
                await self.edge.fail(req.request_id, bus_pb2.CHUNK_ERROR_QUEUE_FULL,
                                     "predicted wait for a first token now exceeds its deadline (the queue "
                                     "ahead drains slower than predicted on arrival); retry later",
                                     retry_after_ms=retry_ms, attempt=self._attempts.get(req.request_id, 0))
                self.cancel(req.request_id)
            if self._deadlines:
                await self._expire_deadlines()
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
                    # Waiting work that cannot be scheduled while nothing is at the worker: only a new
                    # request or an abort changes that, and both set _wake.
                    self._wake.clear()
                    await self._wake.wait()
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
                head = inflight[0]
                left = head.started + self._watch.budget_s(head.plan.num_tokens) - time.perf_counter()
                if not reading.done():
                    await asyncio.wait({reading}, timeout=max(0.0, left))
                if not reading.done():   # a result already on its way (this process was stopped) gets a moment
                    await asyncio.wait({reading}, timeout=HUNG_GRACE_S)
                if not reading.done():
                    await self._on_worker_hung(head, time.perf_counter() - head.started)
                    return
                result = reading.result()
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
            self._watch.observe(head.plan.num_tokens, result.execute_ms / 1000)
            self.metrics.step(now - head.started, head.plan.num_tokens)
            if self._speculative:
                self._charge_drafts(head.plan)
            chunks = self._encode_outputs(core.process(result))
            if self._speculative:   # per-method drafts proposed / accepted, by difference (O(methods))
                self.metrics.spec_totals(core.spec_totals())

    def _charge_drafts(self, plan: StepPlan) -> None:
        """A speculating request computed 1 + k of the step's tokens, where CostMeter bills each request
        one token per step: bill its k draft slots too (accepted or not, they were computed)."""
        c = self.metrics.cost.last_token_cost
        base = self._cost_base
        for r in plan.running:
            if r.num_spec_tokens and r.request_id in base:
                base[r.request_id] -= r.num_spec_tokens * c

    async def _send(self, plan: StepPlan, inflight: deque[_InFlight]) -> None:
        trace = self._spans.step_context(plan) if self._spans is not None and self._spans.reqs else None
        inflight.append(_InFlight(plan, time.perf_counter()))
        try:
            await self.remote.send(plan, trace)
        except WorkerLostError:
            pass   # the pending read fails the same way and handles it

    async def _publish_step(self, chunks: list[tuple[str, bytes, str | None]]) -> None:
        """Publish a step's chunks; a stream whose last chunk this is ends once it is out."""
        publish = self.nc.publish
        for subject, data, last_of in chunks:
            await publish(subject, data)
            if last_of is not None:
                self._end(last_of)
        await self._flush_kv_events()

    def _end(self, rid: str) -> None:
        if self.edge.end(rid) is not None:
            self.adapters.requests_changed()   # an adapter unload may be waiting for this request

    def _apply_aborts(self) -> None:
        """Abort the cancelled requests (blocks back to the allocator) and confirm each cancel."""
        if not self._aborts or self.core is None:
            return
        aborts, self._aborts = self._aborts, {}
        for rid, applied in aborts.items():
            if self.core.abort(rid):   # False: it finished meanwhile (its last chunk may still be going out)
                self._priority.pop(rid, None)
                self._attempts.pop(rid, None)
                self.metrics.forget(rid)
                self._cost_base.pop(rid, None)
                if self._spans is not None:
                    self._spans.abort(rid)
            self._end(rid)
            if not applied.done():
                applied.set_result(None)

    def _encode_outputs(self, outputs: list[RequestOutput]) -> list[tuple[str, bytes, str | None]]:
        """One TokenChunk per request that produced tokens this step, with usage, cost, metrics
        and spans settled now (at the step's end); only the sending is deferred. The third item
        is the request id when the chunk is its stream's last."""
        chunks: list[tuple[str, bytes, str | None]] = []
        streams = self.edge.streams
        cost = self.metrics.cost
        attempts = self._attempts
        spans = self._spans if self._spans is not None and self._spans.reqs else None
        now = time.perf_counter()
        for o in outputs:
            subject = streams.get(o.request_id)
            if subject is None:
                continue
            self.metrics.tokens_emitted(o.request_id, o.num_output_tokens, len(o.new_token_ids), now, o.finished)
            if o.request_id not in self._cost_base:   # its first token here: the cost share starts
                self._cost_base[o.request_id] = cost.first_token_base(o.num_prompt_tokens - o.num_cached_tokens)
            chunk = bus_pb2.TokenChunk(request_id=o.request_id, token_ids=o.new_token_ids, text=o.new_text)
            if attempts:
                chunk.attempt = attempts.get(o.request_id, 0)
            if o.logprobs:
                chunk.logprobs.extend(o.logprobs)
            if o.finished:
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
                attempts.pop(o.request_id, None)
                u.cost_usd = cost.integral - base if base is not None else 0.0
                # speculative decoding: drafts verified / accepted and decode steps (its tokens per step:
                # (completion_tokens - 1) / decode_steps); the router copies usage to the client unchanged
                u.spec_proposed_tokens = o.spec_proposed
                u.spec_accepted_tokens = o.spec_accepted
                u.decode_steps = o.decode_steps
                self.metrics.request_tokens_per_step(o.num_output_tokens, o.decode_steps)
                self.metrics.request_finished(self._priority.pop(o.request_id, 0), o.finish_reason, o.queue_ms,
                                              o.prefill_ms, o.decode_ms)
                if spans is not None:
                    spans.output(o, u.cost_usd)
            elif spans is not None:
                spans.output(o)
            chunks.append((subject, chunk.SerializeToString(), o.request_id if o.finished else None))
        return chunks

    async def _flush_kv_events(self) -> None:
        if self._kv_events:
            events, self._kv_events = self._kv_events, []
            await self.edge.publish_kv(events)

    async def _on_worker_lost(self, why: str) -> None:
        """Fail every in-flight request with UNAVAILABLE at once; then try to reconnect."""
        log.error("worker %s lost: %s", self.worker_id, why)
        self.healthy = False
        self.core = None
        await self.edge.publish_heartbeat()
        for rid in list(self.edge.streams):
            await self.edge.fail(rid, bus_pb2.CHUNK_ERROR_UNAVAILABLE,
                                 f"worker {self.worker_id} died mid-request ({why}); retry", reason="worker_lost",
                                 attempt=self._attempts.get(rid, 0))
        for applied in self._aborts.values():   # those requests went with the worker
            if not applied.done():
                applied.set_result(None)
        self._aborts.clear()
        self._priority.clear()
        self._cost_base.clear()
        self._attempts.clear()
        self._deadlines.clear()
        self.adapters.requests_changed()
        if self._spans is not None:
            self._spans.fail_all(f"worker lost: {why}")
        self._kv_events = [KvEvent(CLEARED, [], block_size=self.info.block_size if self.info else 0)]
        await self._flush_kv_events()

    async def _expire_deadlines(self) -> None:
        """Drop requests whose deadline passed (the client has its DEADLINE_EXCEEDED already; a router
        that stalled may not have cancelled): an error chunk, then the abort frees their blocks."""
        now_ms = time.time() * 1000
        heap = self._deadlines
        while heap and heap[0][0] <= now_ms:
            _, rid = heapq.heappop(heap)
            if rid in self.edge.streams:
                await self.edge.fail(rid, bus_pb2.CHUNK_ERROR_UNAVAILABLE, "the request's deadline passed",
                                     reason="deadline", attempt=self._attempts.get(rid, 0))
                self.cancel(rid)

    async def _on_worker_hung(self, head: _InFlight, waited_s: float) -> None:
        """A step overran its budget: the worker is hung. Say so in a heartbeat (the router stops
        routing here and migrates the streams), fail every stream with reason worker_hung, then exit
        (on_hung) so the launcher restarts the batcher+worker pair."""
        n = head.plan.num_tokens
        predicted = self._watch.predict_s(n)
        why = (f"worker step {head.plan.step_id} ({n} tokens) still running after {waited_s:.1f}s "
               f"(predicted {predicted:.3f}s)" if predicted is not None else
               f"worker step {head.plan.step_id} ({n} tokens) still running after {waited_s:.1f}s")
        log.error("worker %s hung: %s; failing %d stream(s) and exiting for a restart", self.worker_id, why,
                  len(self.edge.streams))
        self.healthy = False
        self.unhealthy_reason = f"worker hung: {why}"
        try:
            await self.edge.publish_heartbeat()
            for rid in list(self.edge.streams):
                await self.edge.fail(rid, bus_pb2.CHUNK_ERROR_UNAVAILABLE,
                                     f"worker {self.worker_id} hung mid-request ({why}); retry", reason="worker_hung",
                                     attempt=self._attempts.get(rid, 0))
            await self.nc.flush(timeout=2)
        except (nats.errors.Error, asyncio.TimeoutError) as e:   # NATS down too: the router's expiry covers it
            log.warning("worker %s: hung-worker notices not all sent: %r", self.worker_id, e)
        self.on_hung()

    async def _reconnect(self) -> None:
        """Wait for the worker to serve again (it restarts, or a failed Step stream is reopened)."""
        try:
            await self._connect_worker(timeout=None)
            log.warning("worker %s reconnected", self.worker_id)
        except grpc.aio.AioRpcError as e:   # it went away again between SERVING and Health: start over
            log.warning("worker %s not back: %s", self.worker_id, e.code())
            await wait_set(self._stop, RECONNECT_BACKOFF_S)   # backoff, cut short by stop()

    # ---- heartbeat: the edge publishes it, this adds the engine's part -------------------------
    def heartbeat(self) -> bus_pb2.Heartbeat:
        return self.edge.heartbeat()

    def fill_heartbeat(self, hb: bus_pb2.Heartbeat) -> None:
        if self.unhealthy_reason:
            hb.unhealthy_reason = self.unhealthy_reason
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
            arrivals, waits, room = self.core.scheduler.forecast()
            # the router refuses at once what this batcher would refuse (router/admission_gate.py)
            hb.forecast_arrivals.extend(arrivals)
            hb.forecast_wait_ms.extend(1000.0 * w for w in waits)
            hb.queue_room = room

    def _adapter_in_use(self, adapter_id: str) -> int:
        """Accepted requests (waiting or running) for an adapter; counted while it is being unloaded."""
        core = self.core
        if core is None:   # worker lost: its requests were failed already
            return 0
        return sum(1 for r in core.scheduler.requests.values() if r.adapter_id == adapter_id)
