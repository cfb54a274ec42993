"""Worker choice: DESIGN.md's cost = overlap_weight * uncached_prefill_blocks + decode_load.

That is the default policy, "kv". StackConfig.routing_policy also offers the two baselines the
routing benchmark (`switchyard bench compare --routing`) measures it against:
"least_loaded" (lowest load, prefix overlap ignored) and "round_robin" (each model's routable
workers in turn, in worker-id order).

Candidates come from batcher heartbeats through the router's `WorkerTable`, a ReplicaTable
(common/replicas.py: expiry, load, models, adapters, and the `changed` pulse whoever waits for a
worker to show something waits on). A candidate's load is the larger of what the worker last
reported and what this router has in flight on it: heartbeats are up to an interval old, and a burst
of requests must spread before the next one arrives.
"""
from __future__ import annotations

from dataclasses import dataclass

from common.config import KV, LEAST_LOADED, POLICIES, ROUND_ROBIN, normalize_policy
from common.replicas import ReplicaTable


@dataclass
class Candidate:
    worker_id: str
    matched_blocks: int = 0
    load: int = 0


def cost(c: Candidate, prompt_blocks: int, overlap_weight: float = 1.0, load_weight: float = 1.0) -> float:
    uncached = max(0, prompt_blocks - c.matched_blocks)
    return overlap_weight * uncached + load_weight * c.load


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


class WorkerTable(ReplicaTable):
    """The router's replica table (common/replicas.py), plus the routing candidates it yields."""

    def candidates(self, model: str, matched: dict[str, int] | None = None) -> list[Candidate]:
        matched = matched or {}
        return [Candidate(w.worker_id, matched.get(w.worker_id, 0), w.load) for w in self.routable(model)]
