"""Prefixes the router has just sent somewhere, before the KV index can know about them.

The KV index learns a block only after the worker has computed and cached it (a KV event after
prefill), so requests sharing a prefix that arrive while the first one is still queued or in
prefill would be routed on load alone and scatter the prefix over workers. The router remembers
its own recent decisions for a few seconds and counts them as (predicted) overlap.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence


class RecentPrefixes:
    def __init__(self, ttl_s: float = 10.0, max_hashes: int = 200_000):
        self.ttl_s = ttl_s
        self.max_hashes = max_hashes
        self._where: OrderedDict[int, tuple[str, float]] = OrderedDict()   # hash -> (worker, when)

    def record(self, worker_id: str, block_hashes: Sequence[int], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for h in block_hashes:
            self._where[h] = (worker_id, now)
            self._where.move_to_end(h)
        while len(self._where) > self.max_hashes:
            self._where.popitem(last=False)

    def match(self, block_hashes: Sequence[int], now: float | None = None) -> dict[str, int]:
        """Leading blocks per worker that the router sent there within the TTL."""
        now = time.monotonic() if now is None else now
        out: dict[str, int] = {}
        worker = None
        for i, h in enumerate(block_hashes):
            hit = self._where.get(h)
            if hit is None or now - hit[1] > self.ttl_s or (worker is not None and hit[0] != worker):
                break
            worker = hit[0]
            out[worker] = i + 1
        return out


def merge_matches(indexed: dict[str, int], recent: dict[str, int]) -> dict[str, int]:
    """Per worker, the longer of the KV index's (cached) and the router's (predicted) overlap."""
    merged = dict(indexed)
    for w, n in recent.items():
        merged[w] = max(merged.get(w, 0), n)
    return merged
