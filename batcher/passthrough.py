"""The pass-through batcher: the batcher for engines that batch in flight themselves.

Triton and TensorRT-LLM schedule their own steps, so there is no StepPlan here. Towards the router
it speaks the protocol of the engine batcher through the same code, batcher/nats_edge.py
(BatchRequests in, rejects at once, cancels, heartbeats, KV events, ModelControl load/unload,
drain); this class is the edge's host. Towards the engine it calls a workers/backends Backend.

Admission: a bounded priority queue (higher priority first, FIFO within a class) in front of a
per-worker concurrency limit (`backend_max_concurrency`): the engine never sees more than that
many requests at once, so our priorities decide who waits, not the engine's own queue. A request
runs as one relay task (the backend's stream -> TokenChunks); a cancel cancels that task, which
closes the backend stream (Triton / TensorRT-LLM cancel the request), and is confirmed when the
task has finished.
"""
from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import logging
import time
from dataclasses import dataclass

from batcher.nats_edge import NatsEdge
from common import rpc, subjects
from common.bus_codec import FINISH_TO_PB
from common.config import StackConfig
from common.waiting import wait_set
from kv_manager.events import CLEARED, KvEvent
from protos.switchyard.v1 import bus_pb2
from workers.backends.base import EXHAUSTED, INVALID, NOT_FOUND, UNAVAILABLE, Backend, BackendError, BackendRequest
from workers.engine.errors import QueueFullError
from workers.step_codec import sampling_from_proto

log = logging.getLogger("switchyard.batcher.passthrough")

_CHUNK_ERROR = {INVALID: bus_pb2.CHUNK_ERROR_INVALID, NOT_FOUND: bus_pb2.CHUNK_ERROR_INVALID,
                UNAVAILABLE: bus_pb2.CHUNK_ERROR_UNAVAILABLE, EXHAUSTED: bus_pb2.CHUNK_ERROR_QUEUE_FULL}
START_RETRY_S = 0.5      # start-up: between attempts to reach a backend that is not ready yet
KV_POLL_S = 0.1          # the backends' KV events and stats are read (they push nothing), this often


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
        # The NATS side: requests, cancels, control, heartbeats, KV events, drain (batcher/nats_edge.py).
        self.edge = NatsEdge(nc, self.worker_id, self, heartbeat_interval_s=cfg.heartbeat_interval_s,
                             metrics=metrics)
        self.backend = backend
        self.model = cfg.model                      # the name the router routes by
        self.max_concurrency = max(1, int(max_concurrency))
        self.max_waiting = cfg.engine.max_waiting if max_waiting is None else max_waiting
        self.metrics = metrics
        self._load_tokenizer = tokenizer_loader
        self._tokenizer = None
        self.healthy = False
        self._heap: list[tuple[int, int, _Entry]] = []
        self._seq = itertools.count()
        self._entries: dict[str, _Entry] = {}       # waiting or running, by request id
        self._running = 0
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._prompt_total = 0
        self._gen_total = 0

    # ---- start / stop ----------------------------------------------------------------------
    @property
    def draining(self) -> bool:
        return self.edge.draining

    @property
    def unloaded(self) -> bool:
        return self.edge.unloaded

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
            if await wait_set(self._stop, START_RETRY_S):   # retry shortly, unless stopped meanwhile
                raise BackendError(UNAVAILABLE, f"worker {self.worker_id}: stopped while its backend was starting")
        self.healthy = True
        await self.edge.publish_kv([KvEvent(CLEARED, [], block_size=self.cfg.engine.block_size)])
        self._tasks = [asyncio.create_task(self._dispatch_loop(), name="passthrough-dispatch"),
                       asyncio.create_task(self._kv_loop(), name="passthrough-kv")]
        await self.edge.start()

    async def drain(self, grace: float) -> None:
        """Stop admitting; running and waiting requests get `grace` s, the rest are cancelled."""
        await self.edge.drain(grace)

    async def stop(self) -> None:
        self._stop.set()
        await self.edge.stop()
        relays = [e.task for e in self._entries.values() if e.task]
        for t in self._tasks + relays:
            t.cancel()
        for t, out in zip(self._tasks, await asyncio.gather(*self._tasks, return_exceptions=True)):
            if isinstance(out, Exception):
                log.error("pass-through task %s had failed: %r", t.get_name(), out, exc_info=out)
        await asyncio.gather(*relays, return_exceptions=True)   # each relay answers for itself
        await self.backend.close()

    @property
    def num_waiting(self) -> int:
        return len(self._entries) - self._running

    # ---- the edge's host (batcher/nats_edge.py) ----------------------------------------------
    def unavailable_reason(self) -> str:
        return f"its {self.backend.name} backend is not available"

    def admit(self, req: bus_pb2.BatchRequest, reply: str) -> None:
        """Queue by priority (QueueFullError / InvalidRequestError refuse it) and start what fits."""
        if self.num_waiting >= self.max_waiting:
            raise QueueFullError(f"worker {self.worker_id} queue is full ({self.num_waiting} waiting, "
                                 f"{self._running} running on its {self.backend.name} backend); retry later",
                                 retry_after_ms=int(min(5000, 100 + 50 * self.num_waiting / self.max_concurrency)))
        sampling_from_proto(req.sampling).validate()
        e = _Entry(req, reply, time.perf_counter())
        self._entries[req.request_id] = e
        heapq.heappush(self._heap, (-req.priority, next(self._seq), e))
        self._dispatch()

    def cancel(self, request_id: str) -> asyncio.Future:
        """A waiting request leaves the queue; a running one's relay is cancelled, which closes the
        backend stream. The future resolves when the relay has finished."""
        done = asyncio.get_running_loop().create_future()
        e = self._entries.pop(request_id, None)
        if e is None or e.task is None or e.task.done():
            if e is not None:
                e.cancelled = True
                self._wake.set()
            self.edge.end(request_id)
            done.set_result(None)
            return done
        e.cancelled = True
        e.task.cancel()   # _relay_done ends the stream
        e.task.add_done_callback(lambda _: done.done() or done.set_result(None))
        return done

    async def control(self, ctl: bus_pb2.ModelControl) -> bus_pb2.ModelControlReply:
        out = bus_pb2.ModelControlReply(ok=True)
        try:
            if ctl.model and ctl.model != self.model:
                raise BackendError(NOT_FOUND, f"worker {self.worker_id} serves {self.model!r}, not {ctl.model!r}")
            if ctl.action == "unload":
                self.edge.unloaded = True
                await self.backend.unload()
            elif ctl.action == "load":
                await self.backend.load()
                self.edge.unloaded = False
                self.healthy = await self.backend.ready()
            else:
                raise BackendError(INVALID, f"unknown action {ctl.action!r} (load | unload)")
        except BackendError as e:
            out = bus_pb2.ModelControlReply(ok=False, error=e.message)
        await self.edge.publish_heartbeat()
        return out

    async def before_heartbeat(self) -> None:
        if not self.unloaded:
            ready = await self.backend.ready()
            if ready != self.healthy:
                log.warning("%s backend %s", self.backend.name, "ready again" if ready else "not ready")
                self.healthy = ready

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
            # A callback, not the relay's `finally`: a task cancelled before it ran never reaches that.
            e.task.add_done_callback(functools.partial(self._relay_done, e.req.request_id))

    def _relay_done(self, rid: str, _task: asyncio.Task) -> None:
        self._entries.pop(rid, None)
        self.edge.end(rid)
        self._running -= 1
        self._wake.set()

    async def _dispatch_loop(self) -> None:
        while not self._stop.is_set():
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
                from common.tokenizers import load_tokenizer as loader
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
                        self._entries.pop(rid, None)   # a cancel from now on has nothing to stop
                        await publish(reply, chunk.SerializeToString())
                        return
                    await publish(reply, chunk.SerializeToString())
            finally:
                await gen.aclose()
            raise BackendError(UNAVAILABLE, f"{self.backend.name} backend ended the stream without finishing")
        except asyncio.CancelledError:
            return   # our cancel (router gone, or the drain's end): nothing to send
        except BackendError as err:
            if self._entries.pop(rid, None) is not None:
                await self.edge.fail(rid, _CHUNK_ERROR.get(err.code, bus_pb2.CHUNK_ERROR_INTERNAL), err.message,
                                     retry_after_ms=err.retry_after_ms)
            if err.code == UNAVAILABLE and not await self.backend.ready():
                self.healthy = False
                await self.edge.publish_heartbeat()
        except Exception as err:  # noqa: BLE001 - a bug or a backend's own error type: logged, and answered
            log.exception("worker %s: relay of %s to the %s backend failed", self.worker_id, rid, self.backend.name)
            if self._entries.pop(rid, None) is not None:
                await self.edge.fail(rid, bus_pb2.CHUNK_ERROR_INTERNAL,
                                     f"{self.backend.name} backend failed: {type(err).__name__}: {rpc.describe(err)}")

    # ---- heartbeat (the edge publishes it; this adds the backend's part) and KV events --------------
    def heartbeat(self) -> bus_pb2.Heartbeat:
        return self.edge.heartbeat()

    def fill_heartbeat(self, hb: bus_pb2.Heartbeat) -> None:
        hb.num_running = self._running
        hb.num_waiting = max(0, self.num_waiting)
        hb.block_size = self.cfg.engine.block_size
        hb.max_model_len = self.backend.max_model_len or self.cfg.engine.max_model_len or 0
        hb.prompt_tokens_total = self._prompt_total
        hb.generation_tokens_total = self._gen_total
        s = self.backend.stats()
        if s is not None:   # the engine's own view of its load, when it reports one
            hb.num_running = max(hb.num_running, s.num_running)
            hb.num_waiting = max(hb.num_waiting, s.num_waiting)
            hb.kv_usage = s.kv_usage
            hb.num_free_blocks = s.num_free_blocks
            hb.num_blocks = s.num_blocks
            if s.block_size:
                hb.block_size = s.block_size

    async def _kv_loop(self) -> None:
        """The backends expose KV events and stats only to be read: read them every KV_POLL_S."""
        while not await wait_set(self._stop, KV_POLL_S):
            try:
                await self.edge.publish_kv(await self.backend.kv_events())
            except Exception:  # noqa: BLE001 - the engine's own API (any type): logged, the next read retries
                log.warning("worker %s: KV events from the %s backend not read", self.worker_id, self.backend.name,
                            exc_info=True)
