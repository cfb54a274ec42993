"""The pass-through batcher: the batcher for engines that batch in flight themselves.

Triton and TensorRT-LLM schedule their own steps, so there is no StepPlan here. Towards the router
this speaks exactly the protocol of batcher/service.py: BatchRequests on sy.req.<worker>, one
TokenChunk stream per request on its reply subject (the last carries finish reason and usage),
rejections at once (queue full -> retry-after), cancels on sy.cancel.<id>, heartbeats with load on
sy.hb.<worker>, KV events on sy.kv.<worker> when the backend reports them, and load/unload on
sy.ctl.<worker>. Towards the engine it calls a workers/backends Backend.

Admission: a bounded priority queue (higher priority first, FIFO within a class) in front of a
per-worker concurrency limit (`backend_max_concurrency`): the engine never sees more than that
many requests at once, so our priorities decide who waits, not the engine's own queue.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from dataclasses import dataclass

from kv_manager.events import CLEARED, KvEvent
from protos.switchyard.v1 import bus_pb2
from services import subjects
from services.bus_codec import FINISH_TO_PB, kv_events_to_proto
from services.config import StackConfig
from workers.backends.base import EXHAUSTED, INVALID, NOT_FOUND, UNAVAILABLE, Backend, BackendError, BackendRequest
from workers.engine.errors import InvalidRequestError
from workers.step_codec import sampling_from_proto

log = logging.getLogger("switchyard.batcher.passthrough")

_CHUNK_ERROR = {INVALID: bus_pb2.CHUNK_ERROR_INVALID, NOT_FOUND: bus_pb2.CHUNK_ERROR_INVALID,
                UNAVAILABLE: bus_pb2.CHUNK_ERROR_UNAVAILABLE, EXHAUSTED: bus_pb2.CHUNK_ERROR_QUEUE_FULL}
_REASONS = {bus_pb2.CHUNK_ERROR_QUEUE_FULL: "queue_full", bus_pb2.CHUNK_ERROR_INVALID: "invalid",
            bus_pb2.CHUNK_ERROR_UNAVAILABLE: "unavailable", bus_pb2.CHUNK_ERROR_INTERNAL: "internal"}


@dataclass
class _Entry:
    req: bus_pb2.BatchRequest
    reply: str
    arrival: float
    cancelled: bool = False
    task: asyncio.Task | None = None


class PassthroughBatcher:
    def __init__(self, cfg: StackConfig, worker_id: str, nc, backend: Backend, *, max_concurrency: int = 8,
                 max_waiting: int | None = None, tokenizer_loader=None, metrics=None):
        self.cfg = cfg
        self.worker_id = subjects.check_token(worker_id, "worker id")
        self.nc = nc
        self.backend = backend
        self.model = cfg.model                      # the name the router routes by
        self.max_concurrency = max(1, int(max_concurrency))
        self.max_waiting = cfg.max_waiting if max_waiting is None else max_waiting
        self.metrics = metrics
        self._load_tokenizer = tokenizer_loader
        self._tokenizer = None
        self.healthy = False
        self.unloaded = False
        self.draining = False
        self._heap: list[tuple[int, int, _Entry]] = []
        self._seq = itertools.count()
        self._entries: dict[str, _Entry] = {}       # waiting or running, by request id
        self._running = 0
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._subs = []
        self._hb_seq = 0
        self._kv_seq = 0
        self._prompt_total = 0
        self._gen_total = 0

    # ---- start / stop ----------------------------------------------------------------------
    async def start(self, ready_timeout: float = 60.0) -> None:
        """Connect the backend (retrying until ready_timeout), then serve. Raises if it never comes up."""
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                await self.backend.start()
                break
            except BackendError as e:
                if e.code == INVALID or time.monotonic() > deadline:
                    raise
                log.warning("backend not ready yet: %s", e.message)
                await asyncio.sleep(0.5)
        self.healthy = True
        self._subs.append(await self.nc.subscribe(subjects.request(self.worker_id), cb=self._on_request))
        self._subs.append(await self.nc.subscribe(subjects.ALL_CANCELS, cb=self._on_cancel))
        self._subs.append(await self.nc.subscribe(subjects.control(self.worker_id), cb=self._on_control))
        await self._publish_kv([KvEvent(CLEARED, [], block_size=self.cfg.block_size)])
        self._tasks = [asyncio.create_task(self._dispatch_loop(), name="passthrough-dispatch"),
                       asyncio.create_task(self._heartbeat_loop(), name="passthrough-heartbeat"),
                       asyncio.create_task(self._kv_loop(), name="passthrough-kv")]
        await self._publish_heartbeat()

    async def drain(self, grace: float) -> None:
        self.draining = True
        await self._publish_heartbeat()
        deadline = time.monotonic() + grace
        while self._entries and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for e in list(self._entries.values()):
            await self._cancel_entry(e)

    async def stop(self) -> None:
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001
                pass
        for t in self._tasks + [e.task for e in self._entries.values() if e.task]:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        await self.backend.close()

    @property
    def num_waiting(self) -> int:
        return len(self._entries) - self._running

    # ---- NATS callbacks --------------------------------------------------------------------
    async def _on_request(self, msg) -> None:
        req = bus_pb2.BatchRequest.FromString(msg.data)
        reply = req.reply_subject or subjects.tokens(req.request_id)
        if not self.healthy or self.draining or self.unloaded:
            why = ("draining" if self.draining else "unloaded" if self.unloaded
                   else f"its {self.backend.name} backend is not available")
            await self._reject(reply, req.request_id, bus_pb2.CHUNK_ERROR_UNAVAILABLE,
                               f"worker {self.worker_id} is {why}; retry")
            return
        if req.deadline_unix_ms and req.deadline_unix_ms <= time.time() * 1000:
            await self._reject(reply, req.request_id, bus_pb2.CHUNK_ERROR_UNAVAILABLE, "deadline already passed")
            return
        if self.num_waiting >= self.max_waiting:
            retry = int(min(5000, 100 + 50 * self.num_waiting / self.max_concurrency))
            await self._reject(reply, req.request_id, bus_pb2.CHUNK_ERROR_QUEUE_FULL,
                               f"worker {self.worker_id} queue is full ({self.num_waiting} waiting, "
                               f"{self._running} running on its {self.backend.name} backend); retry later",
                               retry_after_ms=retry)
            return
        try:
            sampling_from_proto(req.sampling).validate()
        except InvalidRequestError as e:
            await self._reject(reply, req.request_id, bus_pb2.CHUNK_ERROR_INVALID, str(e), field=e.field)
            return
        e = _Entry(req, reply, time.perf_counter())
        self._entries[req.request_id] = e
        heapq.heappush(self._heap, (-req.priority, next(self._seq), e))
        self._dispatch()

    async def _on_cancel(self, msg) -> None:
        e = self._entries.get(subjects.last_token(msg.subject))
        if e is not None:   # every batcher hears every cancel; only the owner acts
            await self._cancel_entry(e)

    async def _cancel_entry(self, e: _Entry) -> None:
        e.cancelled = True
        self._entries.pop(e.req.request_id, None)
        if e.task is not None:
            e.task.cancel()   # closes the backend stream: Triton/TensorRT-LLM cancel the request
        else:
            self._wake.set()

    async def _on_control(self, msg) -> None:
        ctl = bus_pb2.ModelControl.FromString(msg.data)
        out = bus_pb2.ModelControlReply(ok=True)
        try:
            if ctl.model and ctl.model != self.model:
                raise BackendError(NOT_FOUND, f"worker {self.worker_id} serves {self.model!r}, not {ctl.model!r}")
            if ctl.action == "unload":
                self.unloaded = True
                await self.backend.unload()
            elif ctl.action == "load":
                await self.backend.load()
                self.unloaded = False
                self.healthy = await self.backend.ready()
            else:
                raise BackendError(INVALID, f"unknown action {ctl.action!r} (load | unload)")
        except BackendError as e:
            out = bus_pb2.ModelControlReply(ok=False, error=e.message)
        await self._publish_heartbeat()
        if msg.reply:
            await self.nc.publish(msg.reply, out.SerializeToString())

    async def _reject(self, reply: str, rid: str, error: int, message: str, *, retry_after_ms: int = 0,
                      field: str = "") -> None:
        if self.metrics is not None:
            self.metrics.reject(_REASONS.get(error, "internal"))
        chunk = bus_pb2.TokenChunk(request_id=rid, error=error, error_message=message,
                                   retry_after_ms=retry_after_ms, error_field=field)
        await self.nc.publish(reply, chunk.SerializeToString())

    # ---- dispatch and relay ----------------------------------------------------------------
    def _dispatch(self) -> None:
        """Start the highest-priority waiting requests while seats are free (synchronous: the counts
        that admission reads are always current)."""
        while self._heap and self._running < self.max_concurrency:
            _, _, e = heapq.heappop(self._heap)
            if e.cancelled:
                continue
            self._running += 1
            e.task = asyncio.create_task(self._relay(e), name=f"relay-{e.req.request_id}")

    async def _dispatch_loop(self) -> None:
        while True:
            self._dispatch()
            self._wake.clear()
            await self._wake.wait()

    async def _prompt_text(self, req: bus_pb2.BatchRequest) -> str:
        if req.prompt_text:
            return req.prompt_text
        # Chat requests arrive as the templated token ids: their text is the decoded ids.
        if self._tokenizer is None:
            loader = self._load_tokenizer
            if loader is None:
                from services.tokenizers import load_tokenizer as loader
            self._tokenizer = await asyncio.get_running_loop().run_in_executor(None, loader, self.model)
        return self._tokenizer.decode(list(req.prompt_token_ids), skip_special_tokens=False)

    async def _relay(self, e: _Entry) -> None:
        req, reply, rid = e.req, e.reply, e.req.request_id
        t_dispatch = time.perf_counter()
        t_first = None
        completion = 0
        publish = self.nc.publish
        try:
            sampling = sampling_from_proto(req.sampling)
            deadline_s = (req.deadline_unix_ms / 1000 - time.time()) if req.deadline_unix_ms else None
            breq = BackendRequest(rid, await self._prompt_text(req), list(req.prompt_token_ids), sampling,
                                  req.priority, deadline_s)
            gen = self.backend.generate(breq)
            try:
                async for c in gen:
                    completion += c.num_new_tokens or len(c.token_ids)
                    if t_first is None:
                        t_first = time.perf_counter()
                    chunk = bus_pb2.TokenChunk(request_id=rid, token_ids=c.token_ids, text=c.text)
                    if c.finish_reason:
                        now = time.perf_counter()
                        prompt_tokens = c.prompt_tokens if c.prompt_tokens is not None else len(req.prompt_token_ids)
                        chunk.finish_reason = FINISH_TO_PB.get(c.finish_reason, 0)
                        u = chunk.usage
                        u.prompt_tokens = prompt_tokens
                        u.completion_tokens = completion
                        u.queue_ms = (t_dispatch - e.arrival) * 1000
                        u.prefill_ms = (t_first - t_dispatch) * 1000
                        u.decode_ms = (now - t_first) * 1000
                        u.worker_id = self.worker_id
                        self._prompt_total += prompt_tokens
                        self._gen_total += completion
                        if self.metrics is not None:
                            self.metrics.request_finished(req.priority, c.finish_reason, u.queue_ms, u.prefill_ms,
                                                          u.decode_ms)
                        self._entries.pop(rid, None)
                        await publish(reply, chunk.SerializeToString())
                        return
                    await publish(reply, chunk.SerializeToString())
            finally:
                await gen.aclose()
            raise BackendError(UNAVAILABLE, f"{self.backend.name} backend ended the stream without finishing")
        except asyncio.CancelledError:
            return   # our cancel (router gone): nothing to send
        except BackendError as err:
            if rid in self._entries:
                await self._reject(reply, rid, _CHUNK_ERROR.get(err.code, bus_pb2.CHUNK_ERROR_INTERNAL),
                                   err.message, retry_after_ms=err.retry_after_ms)
            if err.code == UNAVAILABLE and not await self.backend.ready():
                self.healthy = False
                await self._publish_heartbeat()
        except Exception as err:  # noqa: BLE001 - never leave a stream unanswered
            log.exception("relay of %s failed", rid)
            if rid in self._entries:
                await self._reject(reply, rid, bus_pb2.CHUNK_ERROR_INTERNAL,
                                   f"{self.backend.name} backend failed: {type(err).__name__}: {err}")
        finally:
            self._entries.pop(rid, None)
            self._running -= 1
            self._wake.set()

    # ---- heartbeats, health, KV events ---------------------------------------------------------
    def heartbeat(self) -> bus_pb2.Heartbeat:
        self._hb_seq += 1
        hb = bus_pb2.Heartbeat(worker_id=self.worker_id, model=self.model,
                               healthy=self.healthy and not self.unloaded, draining=self.draining,
                               seq=self._hb_seq, interval_ms=int(self.cfg.heartbeat_interval_s * 1000),
                               num_running=self._running, num_waiting=max(0, self.num_waiting),
                               block_size=self.cfg.block_size,
                               max_model_len=self.backend.max_model_len or self.cfg.max_model_len or 0,
                               prompt_tokens_total=self._prompt_total, generation_tokens_total=self._gen_total)
        s = self.backend.stats()
        if s is not None:   # the engine's own view of its load, when it reports one
            hb.num_running = max(hb.num_running, s.num_running)
            hb.num_waiting = max(hb.num_waiting, s.num_waiting)
            hb.kv_usage = s.kv_usage
            hb.num_free_blocks = s.num_free_blocks
            hb.num_blocks = s.num_blocks
            if s.block_size:
                hb.block_size = s.block_size
        return hb

    async def _publish_heartbeat(self) -> None:
        await self.nc.publish(subjects.heartbeat(self.worker_id), self.heartbeat().SerializeToString())

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat_interval_s)
            try:
                if not self.unloaded:
                    ready = await self.backend.ready()
                    if ready != self.healthy:
                        log.warning("%s backend %s", self.backend.name, "ready again" if ready else "not ready")
                        self.healthy = ready
                await self._publish_heartbeat()
            except Exception:  # noqa: BLE001 - NATS reconnecting: the next beat will do
                log.debug("heartbeat failed", exc_info=True)

    async def _publish_kv(self, events: list[KvEvent]) -> None:
        if events:
            self._kv_seq += 1
            batch = kv_events_to_proto(self.worker_id, self._kv_seq, events)
            await self.nc.publish(subjects.kv_events(self.worker_id), batch.SerializeToString())

    async def _kv_loop(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            try:
                await self._publish_kv(await self.backend.kv_events())
            except Exception:  # noqa: BLE001
                log.debug("kv events failed", exc_info=True)
