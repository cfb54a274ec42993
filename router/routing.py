"""Worker choice: DESIGN.md's cost = overlap_weight * uncached_prefill_blocks + decode_load.

That is the default policy, "kv". StackConfig.routing_policy also offers the two baselines the
routing benchmark (`switchyard bench compare --routing`) measures it against:
"least_loaded" (lowest load, prefix overlap ignored) and "round_robin" (each model's routable
workers in turn, in worker-id order).

Candidates come from batcher heartbeats (a worker silent for `timeout_s` is dropped). Load is the
larger of what the worker last reported and what this router has in flight on it: heartbeats are
up to an interval old, and a burst of requests must spread before the next one arrives.
`WorkerTable.changed` fires on every heartbeat observed and every worker dropped, so whoever waits
for a worker to show something (an adapter, a model's replica) waits on it, not on a timer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from protos.switchyard.v1 import bus_pb2
from services.waiting import Pulse


@dataclass
class WorkerView:
    worker_id: str
    heartbeat: bus_pb2.Heartbeat
    last_seen: float                     # time.monotonic()
    in_flight: int = 0                   # this router's open streams on it

    @property
    def model(self) -> str:
        return self.heartbeat.model

    @property
    def routable(self) -> bool:
        return self.heartbeat.healthy and not self.heartbeat.draining

    @property
    def reported_load(self) -> int:
        return self.heartbeat.num_running + self.heartbeat.num_waiting


@dataclass
class Candidate:
    worker_id: str
    matched_blocks: int = 0
    load: int = 0


def cost(c: Candidate, prompt_blocks: int, overlap_weight: float = 1.0, load_weight: float = 1.0) -> float:
    uncached = max(0, prompt_blocks - c.matched_blocks)
    return overlap_weight * uncached + load_weight * c.load


KV, LEAST_LOADED, ROUND_ROBIN = "kv", "least_loaded", "round_robin"
POLICIES = (KV, LEAST_LOADED, ROUND_ROBIN)


def normalize_policy(name: str) -> str:
    """'round-robin' / 'Round_Robin' -> 'round_robin'; 'kv-aware' -> 'kv'."""
    n = str(name).strip().lower().replace("-", "_")
    return KV if n in ("kv_aware", "kv_locality") else n


class RoundRobin:
    """Per candidate set, the next index to hand out."""

    def __init__(self) -> None:
        self._next: dict[tuple[str, ...], int] = {}

    def pick(self, candidates: list[Candidate]) -> Candidate:
        ordered = sorted(candidates, key=lambda c: c.worker_id)
        key = tuple(c.worker_id for c in ordered)
        i = self._next.get(key, 0)
        self._next[key] = (i + 1) % len(ordered)
        return ordered[i % len(ordered)]


_ROUND_ROBIN = RoundRobin()   # one router process, one rotation


def needs_kv_match(policy: str) -> bool:
    """Only the kv policy uses KvIndex/Match (the others skip the round trip)."""
    return normalize_policy(policy) == KV


def choose(candidates: list[Candidate], prompt_blocks: int, overlap_weight: float = 1.0,
           load_weight: float = 1.0, policy: str = KV, rr: RoundRobin | None = None) -> Candidate:
    """kv: lowest cost; ties go to the lower load, then the lower worker id (deterministic).
    least_loaded: lowest load, then lower worker id. round_robin: the next worker in turn."""
    if not candidates:
        raise ValueError("no candidates")
    policy = normalize_policy(policy)
    if policy == KV:
        return min(candidates,
                   key=lambda c: (cost(c, prompt_blocks, overlap_weight, load_weight), c.load, c.worker_id))
    if policy == LEAST_LOADED:
        return min(candidates, key=lambda c: (c.load, c.worker_id))
    if policy == ROUND_ROBIN:
        return (rr or _ROUND_ROBIN).pick(candidates)
    raise ValueError(f"unknown routing policy {policy!r}; choose one of {', '.join(POLICIES)}")


@dataclass
class WorkerTable:
    timeout_s: float = 3.0
    workers: dict[str, WorkerView] = field(default_factory=dict)
    changed: Pulse = field(default_factory=Pulse, repr=False, compare=False)

    def observe(self, hb: bus_pb2.Heartbeat, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        w = self.workers.get(hb.worker_id)
        if w is None:
            self.workers[hb.worker_id] = WorkerView(hb.worker_id, hb, now)
        else:
            w.heartbeat, w.last_seen = hb, now
        self.changed.fire()

    def expire(self, now: float | None = None) -> list[str]:
        """Drop workers silent for longer than timeout_s; returns the dropped ids."""
        now = time.monotonic() if now is None else now
        gone = [wid for wid, w in self.workers.items() if now - w.last_seen > self.timeout_s]
        for wid in gone:
            del self.workers[wid]
        if gone:
            self.changed.fire()
        return gone

    def routable(self, model: str) -> list[WorkerView]:
        return [w for w in self.workers.values() if w.model == model and w.routable]

    def models(self) -> dict[str, list[WorkerView]]:
        out: dict[str, list[WorkerView]] = {}
        for w in self.workers.values():
            if w.routable:
                out.setdefault(w.model, []).append(w)
        return out

    def candidates(self, model: str, matched: dict[str, int] | None = None) -> list[Candidate]:
        matched = matched or {}
        return [Candidate(w.worker_id, matched.get(w.worker_id, 0), max(w.reported_load, w.in_flight))
                for w in self.routable(model)]
