"""The KV index service: folds every worker's KV events into one prefix index, tracks load.

NATS in: `sy.kv.*` (KvEventBatch per engine step) and `sy.hb.*` (Heartbeat). gRPC out:
`KvIndex/Match` (prompt block hashes -> per-worker leading overlap + load) and `KvIndex/Status`.
A worker silent for worker_timeout_s is forgotten (its blocks leave the index).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import nats.errors

from kv_manager.index import KvIndex
from protos.switchyard.v1 import bus_pb2, kv_index_pb2, kv_index_pb2_grpc
from services import subjects
from services.bus_codec import kv_events_from_proto
from services.waiting import wait_set

log = logging.getLogger("switchyard.kv_manager")

REAP_EVERY_S = 0.25


@dataclass
class WorkerState:
    heartbeat: bus_pb2.Heartbeat
    last_seen: float  # time.monotonic()


class KvIndexService(kv_index_pb2_grpc.KvIndexServicer):
    def __init__(self, worker_timeout_s: float = 3.0, metrics=None):
        if metrics is None:  # not served: a private registry
            from prometheus_client import CollectorRegistry

            from telemetry.metrics import KvIndexMetrics
            metrics = KvIndexMetrics(CollectorRegistry())
        self.metrics = metrics
        self.index = KvIndex()
        self.workers: dict[str, WorkerState] = {}
        self.worker_timeout_s = worker_timeout_s
        self._kv_seq: dict[str, int] = {}
        self._subs = []
        self._reaper: asyncio.Task | None = None
        self._stop = asyncio.Event()

    async def start(self, nc) -> None:
        self._subs = [await nc.subscribe(subjects.ALL_KV_EVENTS, cb=self._on_kv),
                      await nc.subscribe(subjects.ALL_HEARTBEATS, cb=self._on_heartbeat)]
        self._reaper = asyncio.create_task(self._reap_loop())

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
        hb = bus_pb2.Heartbeat.FromString(msg.data)
        self.workers[hb.worker_id] = WorkerState(hb, time.monotonic())

    async def _reap_loop(self) -> None:
        # A worker's silence is no event: look for silent ones every REAP_EVERY_S, until stop().
        while not await wait_set(self._stop, REAP_EVERY_S):
            self.reap()
            self._update_gauges()

    def _update_gauges(self) -> None:
        m = self.metrics
        m.workers.set(len(self.workers))
        for wid in self.workers:
            m.blocks.labels(wid).set(self.index.num_blocks(wid))

    def reap(self, now: float | None = None) -> list[str]:
        """Drop workers silent for longer than the timeout; returns their ids."""
        now = time.monotonic() if now is None else now
        gone = [w for w, st in self.workers.items() if now - st.last_seen > self.worker_timeout_s]
        for w in gone:
            del self.workers[w]
            self.index.remove_worker(w)
            try:
                self.metrics.blocks.remove(w)
            except KeyError:
                pass
            self._kv_seq.pop(w, None)
        return gone

    def live_workers(self, model: str = "") -> list[WorkerState]:
        return [st for st in self.workers.values()
                if st.heartbeat.healthy and (not model or st.heartbeat.model == model)]

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
        now = time.monotonic()
        resp = kv_index_pb2.StatusResponse(indexed_blocks_total=len(self.index))
        for wid in sorted(self.workers):
            st = self.workers[wid]
            resp.workers.append(status_from_heartbeat(st.heartbeat, now - st.last_seen,
                                                      self.index.num_blocks(wid)))
        return resp


def status_from_heartbeat(hb: bus_pb2.Heartbeat, age_s: float, indexed_blocks: int = 0) -> kv_index_pb2.WorkerStatus:
    return kv_index_pb2.WorkerStatus(
        worker_id=hb.worker_id, model=hb.model, healthy=hb.healthy, draining=hb.draining,
        num_running=hb.num_running, num_waiting=hb.num_waiting, kv_usage=hb.kv_usage,
        num_free_blocks=hb.num_free_blocks, num_blocks=hb.num_blocks, block_size=hb.block_size,
        max_model_len=hb.max_model_len, prefix_cache_hit_rate=hb.prefix_cache_hit_rate,
        num_preemptions=hb.num_preemptions, prompt_tokens_total=hb.prompt_tokens_total,
        generation_tokens_total=hb.generation_tokens_total, indexed_blocks=indexed_blocks,
        last_seen_ms_ago=1000.0 * age_s)
