"""The KV index service: folds every worker's KV events into one prefix index, tracks load.

NATS in: `sy.kv.*` (KvEventBatch per engine step) and `sy.hb.*` (Heartbeat). gRPC out:
`KvIndex/Match` (prompt block hashes -> per-worker leading overlap + load) and `KvIndex/Status`.
Workers come from one ReplicaTable (common/replicas.py); one silent for worker_timeout_s is
forgotten (its blocks leave the index).
"""
from __future__ import annotations

import asyncio
import logging
import time

import nats.errors

from common import subjects
from common.replicas import EXPIRE_EVERY_S, ReplicaTable, ReplicaView
from kv_manager.event_codec import kv_events_from_proto
from kv_manager.index import KvIndex
from protos.switchyard.v1 import bus_pb2, kv_index_pb2, kv_index_pb2_grpc

log = logging.getLogger("switchyard.kv_manager")


class KvIndexService(kv_index_pb2_grpc.KvIndexServicer):
    def __init__(self, worker_timeout_s: float = 3.0, metrics=None):
        if metrics is None:  # not served: a private registry
            from prometheus_client import CollectorRegistry

            from telemetry.metrics import KvIndexMetrics
            metrics = KvIndexMetrics(CollectorRegistry())
        self.metrics = metrics
        self.index = KvIndex()
        self.table = ReplicaTable(worker_timeout_s)
        self._kv_seq: dict[str, int] = {}
        self._subs = []
        self._reaper: asyncio.Task | None = None
        self._stop = asyncio.Event()

    async def start(self, nc) -> None:
        self._subs = [await nc.subscribe(subjects.ALL_KV_EVENTS, cb=self._on_kv),
                      await nc.subscribe(subjects.ALL_HEARTBEATS, cb=self._on_heartbeat)]
        # A worker's silence is no event: the table looks for silent ones every EXPIRE_EVERY_S, until stop().
        self._reaper = asyncio.create_task(self.table.expire_every(EXPIRE_EVERY_S, self._stop, on_expired=self._forget,
                                                                   on_tick=self._update_gauges))

    async def stop(self) -> None:
        self._stop.set()
        if self._reaper:
            self._reaper.cancel()
        for s in self._subs:
            try:
                await s.unsubscribe()
            except nats.errors.Error as e:   # closed or draining already: nothing more arrives
                log.debug("unsubscribe: %r", e)

    # ---- NATS ------------------------------------------------------------------------------
    async def _on_kv(self, msg) -> None:
        batch = bus_pb2.KvEventBatch.FromString(msg.data)
        wid = batch.worker_id or subjects.last_token(msg.subject)
        last = self._kv_seq.get(wid)
        if last is not None and batch.seq != last + 1 and batch.seq != 1:
            # A gap means lost events: the index may believe in blocks the worker evicted. Routing
            # on a stale hint is harmless (a miss costs a prefill), so log and carry on.
            log.warning("kv events from %s: seq %d after %d", wid, batch.seq, last)
        self._kv_seq[wid] = batch.seq
        for ev in kv_events_from_proto(batch):
            self.index.apply(wid, ev)

    async def _on_heartbeat(self, msg) -> None:
        self.table.observe(bus_pb2.Heartbeat.FromString(msg.data))

    def _update_gauges(self) -> None:
        m = self.metrics
        m.workers.set(len(self.table))
        for wid in self.table.workers:
            m.blocks.labels(wid).set(self.index.num_blocks(wid))

    def reap(self, now: float | None = None) -> list[str]:
        """Drop workers silent for longer than the timeout (and their blocks); returns their ids."""
        gone = self.table.expire(now)
        for w in gone:
            self._forget(w)
        return gone

    def _forget(self, w: str) -> None:
        """A worker left the table: its blocks leave the index."""
        self.index.remove_worker(w)
        try:
            self.metrics.blocks.remove(w)
        except KeyError:
            pass
        self._kv_seq.pop(w, None)

    def live_workers(self, model: str = "") -> list[ReplicaView]:
        return self.table.live(model)

    # ---- gRPC --------------------------------------------------------------------------------
    async def Match(self, request: kv_index_pb2.MatchRequest, context) -> kv_index_pb2.MatchResponse:
        t0 = time.perf_counter()
        self.metrics.matches.labels(request.model).inc()
        matched = self.index.match(list(request.block_hashes)) if request.block_hashes else {}
        resp = kv_index_pb2.MatchResponse()
        for st in self.live_workers(request.model):
            hb = st.heartbeat
            resp.workers.add(worker_id=hb.worker_id, matched_blocks=matched.get(hb.worker_id, 0),
                             num_running=hb.num_running, num_waiting=hb.num_waiting, kv_usage=hb.kv_usage)
        self.metrics.match_time.observe(time.perf_counter() - t0)
        return resp

    async def Status(self, request: kv_index_pb2.StatusRequest, context) -> kv_index_pb2.StatusResponse:
        return self.status()

    def status(self) -> kv_index_pb2.StatusResponse:
        indexed = {wid: self.index.num_blocks(wid) for wid in self.table.workers}
        return kv_index_pb2.StatusResponse(indexed_blocks_total=len(self.index), workers=self.table.status(indexed))
