"""The batcher's side of the bus, written once for both batchers.

The engine batcher (batcher/service.py: our scheduler drives a worker's Worker/Step stream) and the
pass-through batcher (batcher/passthrough.py: an external engine batches itself) speak the same
protocol to the router. `NatsEdge` is that protocol; a batcher plugs in as its `host` and supplies
only what differs (`EdgeHost`): how a request is admitted and run, how a cancel is applied, model
control, and its share of the heartbeat.

* `sy.req.<worker>`: a BatchRequest is admitted or rejected at once, in the callback. Not routable
  (draining, unloaded, host unhealthy) or past its deadline: UNAVAILABLE. Otherwise
  `host.admit(req, reply)`; an EngineError it raises (queue full, a bad field, an unknown adapter)
  becomes the reject chunk, built from the error's data (code, field, message, retry-after).
  An admitted request is a *stream* (`streams`: request id -> reply subject) until the host
  `end`s it, after publishing its last chunk.
* `sy.cancel.<id>`: every batcher hears every cancel; the one holding the stream calls
  `host.cancel`, which returns a future resolved once the cancel has been applied. A cancel naming a
  worker (`Cancel.worker_id`: the router moved the stream away from it) is for that batcher only, so
  the replica the stream moved to keeps it.
* Error chunks carry `error_reason` (worker_lost, worker_hung, deadline, draining, ...) and the
  request's `attempt`: the router migrates on some reasons, and drops chunks of a replaced attempt.
* `sy.ctl.<worker>`: ModelControl -> `host.control` -> ModelControlReply on the message's reply
  subject. A host may answer with a future (an adapter unload waits for requests): the reply is
  sent when it resolves, and later control messages do not queue behind it.
* `sy.hb.<worker>`: a heartbeat every `heartbeat_interval_s`, and whenever the host publishes one.
* `sy.kv.<worker>`: KV event batches, numbered.
* drain: stop admitting, wait until the last stream ends (an event, not a poll) or the grace is
  over, then cancel what is left and wait until each cancel is confirmed applied.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

import nats.errors
from google.protobuf.message import DecodeError

from common import subjects
from common.waiting import Pulse, wait_set
from kv_manager.event_codec import kv_events_to_proto
from kv_manager.events import KvEvent
from protos.switchyard.v1 import bus_pb2
from workers.engine.errors import EngineError

log = logging.getLogger("switchyard.batcher.edge")

# EngineError.code (a gRPC status name) -> the chunk error the router maps back to that status.
CHUNK_ERROR = {"INVALID_ARGUMENT": bus_pb2.CHUNK_ERROR_INVALID, "NOT_FOUND": bus_pb2.CHUNK_ERROR_NOT_FOUND,
               "RESOURCE_EXHAUSTED": bus_pb2.CHUNK_ERROR_QUEUE_FULL, "UNAVAILABLE": bus_pb2.CHUNK_ERROR_UNAVAILABLE}
# The rejection metric's reason per chunk error (a caller may name a more precise one).
REJECT_REASONS = {bus_pb2.CHUNK_ERROR_QUEUE_FULL: "queue_full", bus_pb2.CHUNK_ERROR_INVALID: "invalid",
                  bus_pb2.CHUNK_ERROR_UNAVAILABLE: "unavailable", bus_pb2.CHUNK_ERROR_INTERNAL: "internal",
                  bus_pb2.CHUNK_ERROR_NOT_FOUND: "not_found"}
CANCEL_CONFIRM_S = 5.0   # drain: how long to wait for the host to confirm the cancels it was asked for


class EdgeHost(Protocol):
    """What a batcher supplies to its NatsEdge."""
    model: str          # the served name the router routes by
    healthy: bool       # the engine behind it can run requests

    def unavailable_reason(self) -> str:
        """Why requests are refused while not healthy ("its worker is not available")."""

    def admit(self, req: bus_pb2.BatchRequest, reply: str) -> None:
        """Queue the request, or raise EngineError to refuse it (nothing queued)."""

    def cancel(self, request_id: str) -> asyncio.Future:
        """Stop an admitted request; the future resolves once that has been applied."""

    async def control(self, ctl: bus_pb2.ModelControl) -> bus_pb2.ModelControlReply | asyncio.Future:
        """Apply a ModelControl; a future when the work goes on in the background."""

    def fill_heartbeat(self, hb: bus_pb2.Heartbeat) -> None:
        """Add load, KV and model details to a heartbeat the edge has started."""

    async def before_heartbeat(self) -> None:
        """Called before each periodic heartbeat (a backend's readiness check)."""


class NatsEdge:
    def __init__(self, nc, worker_id: str, host: EdgeHost, *, heartbeat_interval_s: float, metrics=None,
                 spans=None):
        self.nc = nc
        self.worker_id = subjects.check_token(worker_id, "worker id")
        self.host = host
        self.heartbeat_interval_s = heartbeat_interval_s
        self.metrics = metrics          # telemetry.metrics.BatcherMetrics, or None
        self.spans = spans              # telemetry.request_spans.BatcherSpans when tracing, else None
        self.draining = False           # drain(): not routable, new requests refused
        self.unloaded = False           # ModelControl "unload": not routable, new requests refused
        self.streams: dict[str, str] = {}   # admitted request id -> reply subject, until end()
        self._stream_ended = Pulse()
        self._hb_seq = 0
        self._kv_seq = 0
        self._stop = asyncio.Event()
        self._subs = []
        self._tasks: set[asyncio.Task] = set()

    # ---- start / drain / stop -------------------------------------------------------------------
    async def start(self) -> None:
        """Subscribe, start the heartbeat loop and announce the worker."""
        self._stop.clear()
        self._subs = [await self.nc.subscribe(subjects.request(self.worker_id), cb=self._on_request),
                      await self.nc.subscribe(subjects.ALL_CANCELS, cb=self._on_cancel),
                      await self.nc.subscribe(subjects.control(self.worker_id), cb=self._on_control)]
        self._spawn(self._heartbeat_loop(), "batcher-heartbeat")
        await self.publish_heartbeat()

    async def drain(self, grace: float) -> bool:
        """Stop admitting; wait up to `grace` s for the open streams to end, then cancel the rest and
        wait for the host to confirm each cancel. True when every stream ended by itself."""
        self.draining = True
        await self.publish_heartbeat()
        if await self._stream_ended.wait_for(lambda: not self.streams, grace):
            return True
        left = list(self.streams)
        log.warning("worker %s: %d stream(s) still open after the %.1fs drain grace; cancelling them",
                    self.worker_id, len(left), grace)
        confirms = [self.host.cancel(rid) for rid in left]
        _, pending = await asyncio.wait(confirms, timeout=CANCEL_CONFIRM_S)
        if pending:
            log.error("worker %s: %d cancel(s) not confirmed after %.0fs", self.worker_id, len(pending),
                      CANCEL_CONFIRM_S)
        return False

    async def stop(self) -> None:
        self._stop.set()
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except nats.errors.Error as e:   # closed or draining already: nothing more arrives
                log.debug("unsubscribe: %r", e)
        self._subs = []
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coro, name: str) -> asyncio.Task:
        t = asyncio.create_task(coro, name=name)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    # ---- streams ---------------------------------------------------------------------------------
    def end(self, request_id: str) -> str | None:
        """The stream is over (its last chunk is out, or it failed or was cancelled): forget it.
        Returns its reply subject, None when it was not open."""
        reply = self.streams.pop(request_id, None)
        if reply is not None:
            self._stream_ended.fire()
        return reply

    async def fail(self, request_id: str, error: int, message: str, *, reason: str = "", retry_after_ms: int = 0,
                   field: str = "", attempt: int = 0) -> None:
        """Answer an admitted request with an error chunk and end its stream."""
        reply = self.end(request_id)
        if reply is not None:
            await self.reject(reply, request_id, error, message, reason=reason, retry_after_ms=retry_after_ms,
                              field=field, attempt=attempt)

    async def reject(self, reply: str, request_id: str, error: int, message: str, *, retry_after_ms: int = 0,
                     field: str = "", reason: str = "", span=None, attempt: int = 0) -> None:
        reason = reason or REJECT_REASONS.get(error, "internal")
        if self.metrics is not None:
            self.metrics.reject(reason)
        if span is not None and self.spans is not None:
            self.spans.rejected(span, reason, message)
        chunk = bus_pb2.TokenChunk(request_id=request_id, error=error, error_message=message,
                                   retry_after_ms=retry_after_ms, error_field=field, error_reason=reason,
                                   attempt=attempt)
        await self.nc.publish(reply, chunk.SerializeToString())

    # ---- NATS callbacks --------------------------------------------------------------------------
    async def _on_request(self, msg) -> None:
        req = bus_pb2.BatchRequest.FromString(msg.data)
        rid = req.request_id
        reply = req.reply_subject or subjects.tokens(rid)
        span = self.spans.receive(msg, req) if self.spans is not None else None
        host = self.host
        if self.draining or self.unloaded or not host.healthy:
            why = "draining" if self.draining else "unloaded" if self.unloaded else host.unavailable_reason()
            await self.reject(reply, rid, bus_pb2.CHUNK_ERROR_UNAVAILABLE, f"worker {self.worker_id} is {why}; retry",
                              span=span, attempt=req.attempt)
            return
        if req.deadline_unix_ms and req.deadline_unix_ms <= time.time() * 1000:
            await self.reject(reply, rid, bus_pb2.CHUNK_ERROR_UNAVAILABLE, "deadline already passed",
                              reason="deadline", span=span, attempt=req.attempt)
            return
        try:
            host.admit(req, reply)
        except EngineError as e:
            error = CHUNK_ERROR.get(e.code, bus_pb2.CHUNK_ERROR_INTERNAL)
            await self.reject(reply, rid, error, str(e), retry_after_ms=e.retry_after_ms, field=e.field, span=span,
                              attempt=req.attempt)
            return
        self.streams[rid] = reply
        if span is not None:
            self.spans.admitted(span, rid, host.model, len(req.prompt_token_ids))

    async def _on_cancel(self, msg) -> None:
        rid = subjects.last_token(msg.subject)
        if rid in self.streams:   # every batcher hears every cancel; only the owner acts
            if msg.data:
                try:
                    target = bus_pb2.Cancel.FromString(msg.data).worker_id
                except DecodeError:
                    target = ""
                if target and target != self.worker_id:
                    return   # the stream moved here from that worker: the cancel is for the old copy
            self.host.cancel(rid)

    async def _on_control(self, msg) -> None:
        ctl = bus_pb2.ModelControl.FromString(msg.data)
        out = await self.host.control(ctl)
        if isinstance(out, asyncio.Future):
            self._spawn(self._answer_when_done(msg.reply, out), f"batcher-{ctl.action}")
        elif msg.reply:
            await self.nc.publish(msg.reply, out.SerializeToString())

    async def _answer_when_done(self, reply: str, work: asyncio.Future) -> None:
        out = await work
        if reply:
            await self.nc.publish(reply, out.SerializeToString())

    # ---- heartbeats and KV events ----------------------------------------------------------------
    def heartbeat(self) -> bus_pb2.Heartbeat:
        self._hb_seq += 1
        hb = bus_pb2.Heartbeat(worker_id=self.worker_id, model=self.host.model,
                               healthy=self.host.healthy and not self.unloaded, draining=self.draining,
                               seq=self._hb_seq, interval_ms=int(self.heartbeat_interval_s * 1000))
        self.host.fill_heartbeat(hb)
        return hb

    async def publish_heartbeat(self) -> None:
        await self.nc.publish(subjects.heartbeat(self.worker_id), self.heartbeat().SerializeToString())

    async def _heartbeat_loop(self) -> None:
        while not await wait_set(self._stop, self.heartbeat_interval_s):
            try:
                await self.host.before_heartbeat()
                await self.publish_heartbeat()
            except nats.errors.Error as e:   # NATS reconnecting or closing: the next beat will do
                log.debug("heartbeat not sent: %r", e)

    async def publish_kv(self, events: list[KvEvent]) -> None:
        if not events:
            return
        self._kv_seq += 1
        batch = kv_events_to_proto(self.worker_id, self._kv_seq, events)
        await self.nc.publish(subjects.kv_events(self.worker_id), batch.SerializeToString())
