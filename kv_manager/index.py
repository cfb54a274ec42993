"""Global KV prefix index: which worker holds which cached block hashes.

Fed by every worker's KV events (``sy.kv.<worker_id>``); queried by the router
with a prompt's chained block hashes. Pure data structure: the gRPC/NATS
service wraps it. Thread-safe (one lock; every operation is short).
"""

from __future__ import annotations

import threading
from typing import Sequence

from .events import CLEARED, REMOVED, STORED, KvEvent

__all__ = ["KvIndex"]


class KvIndex:
    def __init__(self) -> None:
        self._holders: dict[int, set[str]] = {}  # block hash -> workers caching it
        self._by_worker: dict[str, set[int]] = {}  # worker -> block hashes it caches
        self._lock = threading.Lock()

    def apply(self, worker_id: str, event: KvEvent) -> None:
        """Fold one KV event from ``worker_id`` into the index (registers the worker)."""
        kind = event.kind
        with self._lock:
            mine = self._by_worker.setdefault(worker_id, set())
            holders = self._holders
            if kind == STORED:
                for h in event.block_hashes:
                    if h not in mine:
                        mine.add(h)
                        s = holders.get(h)
                        if s is None:
                            holders[h] = {worker_id}
                        else:
                            s.add(worker_id)
            elif kind == REMOVED:
                for h in event.block_hashes:
                    if h in mine:
                        mine.discard(h)
                        self._drop_holder(h, worker_id)
            elif kind == CLEARED:
                for h in mine:
                    self._drop_holder(h, worker_id)
                mine.clear()
            else:
                raise ValueError(f"unknown KV event kind {kind!r}")

    def _drop_holder(self, h: int, worker_id: str) -> None:
        s = self._holders.get(h)
        if s is not None:
            s.discard(worker_id)
            if not s:
                del self._holders[h]

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker and everything it cached (worker gone or restarted)."""
        with self._lock:
            mine = self._by_worker.pop(worker_id, None)
            if mine:
                for h in mine:
                    self._drop_holder(h, worker_id)

    def match(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """Per worker holding the first hash: how many LEADING hashes it holds.

        Walks the prefix once, shrinking the candidate set; a worker's count
        stops at its first miss. Workers without the first block are absent.
        """
        if not block_hashes:
            return {}
        with self._lock:
            first = self._holders.get(block_hashes[0])
            if not first:
                return {}
            candidates = set(first)
            result: dict[str, int] = {}
            n = len(block_hashes)
            for i in range(1, n):
                holders = self._holders.get(block_hashes[i])
                if holders is not None and candidates <= holders:
                    continue  # every candidate still matches
                still = candidates & holders if holders is not None else set()
                for w in candidates - still:
                    result[w] = i
                if not still:
                    return result
                candidates = still
            for w in candidates:
                result[w] = n
            return result

    def workers(self) -> list[str]:
        """Known workers (sorted), including those whose cache is currently empty."""
        with self._lock:
            return sorted(self._by_worker)

    def num_blocks(self, worker_id: str) -> int:
        """How many cached block hashes ``worker_id`` holds (0 if unknown)."""
        with self._lock:
            s = self._by_worker.get(worker_id)
            return len(s) if s is not None else 0

    def __len__(self) -> int:
        """Distinct block hashes cached anywhere."""
        return len(self._holders)
