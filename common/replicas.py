"""The live table of replicas, fed by heartbeats: who is up, what each serves and how busy it is.

Every batcher publishes a `bus_pb2.Heartbeat` on `sy.hb.<worker_id>` every heartbeat_interval_s
(worker id, served model name, healthy / draining, running + waiting requests, KV usage, LoRA adapters,
token counters). A replica is the batcher+worker pair behind one worker id. Three readers keep a table of
them, each its own instance of this one class:

* the router (router/routing.py `WorkerTable`: routing candidates, ListModels, Admin/Status, adapters);
* the KV index service (kv_manager/service.py: load in `KvIndex/Match`, `KvIndex/Status`, and which
  workers' blocks to forget);
* the model pool (services/pool.py: a replica's health and queue depth, idle time, drain checks).

The table owns the bookkeeping they share: expiry (a replica silent for longer than `timeout_s` is
dropped; `expire_every` is the sweep, since silence is no event), load (what the replica reports and
what this reader has in flight on it), models (healthy, routable, grouped by served name), adapters
(advertised by heartbeat), activity (the last heartbeat that showed work), and `changed`, a Pulse fired
on every heartbeat taken in and every replica dropped, so whoever waits for a replica to show something
waits on it (common/waiting.py), not on a timer.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from common.waiting import Pulse, wait_set
from protos.switchyard.v1 import bus_pb2, kv_index_pb2

EXPIRE_EVERY_S = 0.25   # how often silent replicas are looked for


@dataclass(eq=False)
class ReplicaView:
    """One replica as its last heartbeat shows it."""
    worker_id: str
    heartbeat: bus_pb2.Heartbeat
    last_seen: float                     # time.monotonic() of the last heartbeat
    in_flight: int = 0                   # the reader's own open requests on it (the router's streams)
    sent_since_beat: int = 0             # requests the reader sent it since its last heartbeat (the router's gate)
    active: bool = False                 # the last heartbeat showed work (below)
    last_active: float | None = None     # when a heartbeat last showed work

    @property
    def model(self) -> str:
        """The served model name (a pool replica: <model>@<version>)."""
        return self.heartbeat.model

    @property
    def healthy(self) -> bool:
        return self.heartbeat.healthy

    @property
    def routable(self) -> bool:
        """Takes new requests: healthy and not draining."""
        return self.heartbeat.healthy and not self.heartbeat.draining

    @property
    def reported_load(self) -> int:
        """Requests running + waiting, as the replica last reported them (its queue depth)."""
        return self.heartbeat.num_running + self.heartbeat.num_waiting

    @property
    def load(self) -> int:
        """The larger of the reported load and the reader's own in-flight count: a heartbeat is up to an
        interval old, and a burst must spread before the next one arrives."""
        return max(self.reported_load, self.in_flight)

    @property
    def adapters(self) -> tuple[str, ...]:
        """The LoRA adapters it serves (by name)."""
        return tuple(self.heartbeat.adapters)

    def serves(self, adapter: str) -> bool:
        return adapter in self.heartbeat.adapters

    def status(self, now: float | None = None, indexed_blocks: int = 0) -> kv_index_pb2.WorkerStatus:
        """Its line in `switchyard status` (Admin/Status, KvIndex/Status)."""
        now = time.monotonic() if now is None else now
        hb = self.heartbeat
        return kv_index_pb2.WorkerStatus(
            worker_id=hb.worker_id, model=hb.model, healthy=hb.healthy, draining=hb.draining,
            num_running=hb.num_running, num_waiting=hb.num_waiting, kv_usage=hb.kv_usage,
            num_free_blocks=hb.num_free_blocks, num_blocks=hb.num_blocks, block_size=hb.block_size,
            max_model_len=hb.max_model_len, prefix_cache_hit_rate=hb.prefix_cache_hit_rate,
            num_preemptions=hb.num_preemptions, prompt_tokens_total=hb.prompt_tokens_total,
            generation_tokens_total=hb.generation_tokens_total, indexed_blocks=indexed_blocks,
            last_seen_ms_ago=1000.0 * (now - self.last_seen), router_in_flight=self.in_flight)


@dataclass
class ReplicaTable:
    """worker id -> ReplicaView, from heartbeats. Not thread-safe: one event loop feeds and reads it."""
    timeout_s: float = 3.0
    workers: dict[str, ReplicaView] = field(default_factory=dict)
    changed: Pulse = field(default_factory=Pulse, repr=False, compare=False)

    # ---- fed by heartbeats -------------------------------------------------------------------
    def observe(self, hb: bus_pb2.Heartbeat, now: float | None = None) -> ReplicaView:
        """Take in one heartbeat; returns the replica's view (the same object for as long as it is known).

        A heartbeat shows work (`active`) when requests are waiting or running, or when the replica
        generated tokens since its previous heartbeat."""
        now = time.monotonic() if now is None else now
        w = self.workers.get(hb.worker_id)
        if w is None:
            w = self.workers[hb.worker_id] = ReplicaView(hb.worker_id, hb, now)
            w.active = hb.num_running + hb.num_waiting > 0
        else:
            generated = hb.generation_tokens_total != w.heartbeat.generation_tokens_total
            w.heartbeat, w.last_seen = hb, now
            w.sent_since_beat = 0
            w.active = hb.num_running + hb.num_waiting > 0 or generated
        if w.active:
            w.last_active = now
        self.changed.fire()
        return w

    def expire(self, now: float | None = None) -> list[str]:
        """Drop replicas silent for longer than timeout_s; returns the dropped ids."""
        now = time.monotonic() if now is None else now
        gone = [wid for wid, w in self.workers.items() if now - w.last_seen > self.timeout_s]
        for wid in gone:
            del self.workers[wid]
        if gone:
            self.changed.fire()
        return gone

    async def expire_every(self, interval_s: float, stop: asyncio.Event,
                           on_expired: Callable[[str], None] | None = None,
                           on_tick: Callable[[], None] | None = None) -> None:
        """The sweep: every `interval_s` until `stop` is set, expire() and call `on_expired(worker_id)`
        for each replica dropped, then `on_tick()`."""
        while not await wait_set(stop, interval_s):
            for wid in self.expire():
                if on_expired is not None:
                    on_expired(wid)
            if on_tick is not None:
                on_tick()

    def remove(self, worker_id: str) -> ReplicaView | None:
        """Forget a replica now (stopped on purpose); returns its view if it was known."""
        w = self.workers.pop(worker_id, None)
        if w is not None:
            self.changed.fire()
        return w

    # ---- read ---------------------------------------------------------------------------------
    def get(self, worker_id: str) -> ReplicaView | None:
        return self.workers.get(worker_id)

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self.workers

    def __len__(self) -> int:
        return len(self.workers)

    def live(self, model: str = "") -> list[ReplicaView]:
        """Healthy replicas (draining ones included: they still finish what they hold), of `model` if given."""
        return [w for w in self.workers.values() if w.healthy and (not model or w.model == model)]

    def routable(self, model: str) -> list[ReplicaView]:
        """Replicas of `model` that take new requests."""
        return [w for w in self.workers.values() if w.model == model and w.routable]

    def models(self) -> dict[str, list[ReplicaView]]:
        """Served model name -> its routable replicas (models without one are absent)."""
        out: dict[str, list[ReplicaView]] = {}
        for w in self.workers.values():
            if w.routable:
                out.setdefault(w.model, []).append(w)
        return out

    def adapters(self) -> set[str]:
        """Adapters some routable replica advertises."""
        return {a for w in self.workers.values() if w.routable for a in w.heartbeat.adapters}

    def with_adapter(self, adapter: str, model: str | None = None, routable: bool = True) -> list[ReplicaView]:
        """Replicas advertising `adapter` (of `model` if given; only routable ones unless routable=False)."""
        return [w for w in self.workers.values()
                if adapter in w.heartbeat.adapters and (model is None or w.model == model)
                and (w.routable or not routable)]

    def status(self, indexed_blocks: dict[str, int] | None = None,
               now: float | None = None) -> list[kv_index_pb2.WorkerStatus]:
        """Every replica's status line, by worker id."""
        now = time.monotonic() if now is None else now
        indexed_blocks = indexed_blocks or {}
        return [self.workers[wid].status(now, indexed_blocks.get(wid, 0)) for wid in sorted(self.workers)]
