"""Worker choice: DESIGN.md's cost = overlap_weight * uncached_prefill_blocks + decode_load.

Candidates come from batcher heartbeats (a worker silent for `timeout_s` is dropped). Load is the
larger of what the worker last reported and what this router has in flight on it: heartbeats are
up to an interval old, and a burst of requests must spread before the next one arrives.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from protos.switchyard.v1 import bus_pb2


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


def choose(candidates: list[Candidate], prompt_blocks: int, overlap_weight: float = 1.0,
           load_weight: float = 1.0) -> Candidate:
    """Lowest cost; ties go to the lower load, then the lower worker id (deterministic)."""
    if not candidates:
        raise ValueError("no candidates")
    return min(candidates, key=lambda c: (cost(c, prompt_blocks, overlap_weight, load_weight), c.load, c.worker_id))


@dataclass
class WorkerTable:
    timeout_s: float = 3.0
    workers: dict[str, WorkerView] = field(default_factory=dict)

    def observe(self, hb: bus_pb2.Heartbeat, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        w = self.workers.get(hb.worker_id)
        if w is None:
            self.workers[hb.worker_id] = WorkerView(hb.worker_id, hb, now)
        else:
            w.heartbeat, w.last_seen = hb, now

    def expire(self, now: float | None = None) -> list[str]:
        """Drop workers silent for longer than timeout_s; returns the dropped ids."""
        now = time.monotonic() if now is None else now
        gone = [wid for wid, w in self.workers.items() if now - w.last_seen > self.timeout_s]
        for wid in gone:
            del self.workers[wid]
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
