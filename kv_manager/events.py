"""KV cache events: what a worker's allocator tells the KV index.

Published on ``sy.kv.<worker_id>``; the KV index service folds them into its
global prefix index (``kv_manager.index.KvIndex.apply``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KvEvent", "STORED", "REMOVED", "CLEARED", "EVENT_KINDS"]

STORED = "stored"  # blocks now cached (hold KV for these hashes)
REMOVED = "removed"  # blocks evicted: these hashes are no longer cached
CLEARED = "cleared"  # the whole prefix cache of this worker was dropped
EVENT_KINDS = frozenset((STORED, REMOVED, CLEARED))


@dataclass
class KvEvent:
    kind: str
    block_hashes: list[int]
    parent_hash: int | None = None
    token_ids: list[int] | None = None  # stored only: the tokens of the block(s)
    adapter_id: str | None = None
    block_size: int = 0
