"""Paged KV block allocator with a hash-keyed prefix cache.

Every block id 0..num_blocks-1 is, at any time, in exactly one of:

* **referenced**: ref count > 0, owned by one or more running sequences
  (more than one only when shared as a cached prefix);
* **free list**: ref 0, holds no cached hash, ready to hand out;
* **evictable LRU**: ref 0 but still holds a cached hash, so a later request
  with the same prefix can reuse it; reclaimed least-recently-freed first when
  the free list is empty.

``allocate`` never raises for lack of memory: it returns None and changes
nothing, and the scheduler preempts. Every cache store/evict is reported
through ``on_event`` as a :class:`~kv_manager.events.KvEvent` (published on
``sy.kv.<worker_id>`` by the batcher and folded into the KV index).

Not thread-safe: one batcher loop owns one allocator.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from typing import Callable, Sequence

from .events import CLEARED, REMOVED, STORED, KvEvent

__all__ = ["BlockAllocator"]


class BlockAllocator:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        on_event: Callable[[KvEvent], None] | None = None,
    ) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self._num_blocks = num_blocks
        self._block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.on_event = on_event
        self._ref: list[int] = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        # ref-0 cached blocks, oldest (next to evict) first
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._hash_to_block: dict[int, int] = {}
        self._block_hash: list[int | None] = [None] * num_blocks

    # ------------------------------------------------------------------ queries
    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_free_blocks(self) -> int:
        """Blocks an ``allocate`` could hand out now (free list + evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks with ref count > 0."""
        return self._num_blocks - len(self._free) - len(self._evictable)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self._num_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a cached hash (referenced or evictable)."""
        return len(self._hash_to_block)

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def is_cached(self, block_id: int) -> bool:
        return self._block_hash[block_id] is not None

    def block_hash(self, block_id: int) -> int | None:
        """The cached hash this block holds, or None."""
        return self._block_hash[block_id]

    def lookup(self, block_hash: int) -> int | None:
        """The block id holding ``block_hash``, or None."""
        return self._hash_to_block.get(block_hash)

    def match_prefix(self, block_hashes: Sequence[int]) -> list[int]:
        """Block ids of the longest cached run of leading ``block_hashes``.

        Read only (takes no refs, does not touch LRU order): pass the result to
        ``allocate(..., prefix_block_ids=...)`` before anything else allocates.
        """
        if not self.enable_prefix_caching:
            return []
        get = self._hash_to_block.get
        out: list[int] = []
        for h in block_hashes:
            b = get(h)
            if b is None:
                break
            out.append(b)
        return out

    # ---------------------------------------------------------------- mutations
    def allocate(self, num_blocks: int, prefix_block_ids: Sequence[int] = ()) -> list[int] | None:
        """Take a ref on each prefix block and ``num_blocks`` fresh blocks, atomically.

        Returns the fresh block ids only, or None (and changes nothing) if there
        are not enough: prefix blocks that are currently evictable count as no
        longer available. Raises ValueError if a prefix block is neither
        referenced nor cached (a stale ``match_prefix`` result: a caller bug).
        """
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        ref = self._ref
        evictable = self._evictable
        revived = 0
        if prefix_block_ids:
            seen: set[int] = set()
            for b in prefix_block_ids:
                if ref[b] == 0:
                    if b not in evictable:
                        raise ValueError(
                            f"prefix block {b} is free and uncached; match_prefix result is stale"
                        )
                    if b not in seen:
                        revived += 1
                seen.add(b)
        if num_blocks > len(self._free) + len(evictable) - revived:
            return None

        for b in prefix_block_ids:
            if ref[b] == 0:
                del evictable[b]
            ref[b] += 1

        free = self._free
        out: list[int] = []
        evicted: list[int] | None = None
        for _ in range(num_blocks):
            if free:
                b = free.popleft()
            else:
                b, _unused = evictable.popitem(last=False)
                h = self._block_hash[b]
                self._block_hash[b] = None
                del self._hash_to_block[h]  # type: ignore[arg-type]
                if evicted is None:
                    evicted = []
                evicted.append(h)  # type: ignore[arg-type]
            ref[b] = 1
            out.append(b)
        if evicted and self.on_event is not None:
            self.on_event(KvEvent(REMOVED, evicted, block_size=self._block_size))
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one ref per id, last id first (a sequence's tail is evicted before its head).

        Raises ValueError (and changes nothing) if that would take a ref count below 0.
        """
        ref = self._ref
        counts = Counter(block_ids) if len(set(block_ids)) != len(block_ids) else None
        for b in block_ids:
            if ref[b] < (counts[b] if counts is not None else 1):
                raise ValueError(f"double free of KV block {b} (ref count {ref[b]})")
        block_hash = self._block_hash
        for b in reversed(block_ids):
            r = ref[b] - 1
            ref[b] = r
            if r == 0:
                if block_hash[b] is not None:
                    self._evictable[b] = None  # most recently used end
                else:
                    self._free.append(b)

    def cache_block(
        self,
        block_id: int,
        block_hash: int,
        parent_hash: int | None,
        token_ids: Sequence[int],
        adapter_id: str | None = None,
    ) -> None:
        """Record that referenced, full block ``block_id`` holds the KV for ``block_hash``.

        Emits a "stored" event. No-op (no event) when caching is off, when this
        block already holds this hash, or when the hash is already held by another
        block (this block then stays uncached and returns to the free list).
        """
        if not self.enable_prefix_caching:
            return
        if self._ref[block_id] <= 0:
            raise ValueError(f"cache_block on unreferenced KV block {block_id}")
        if len(token_ids) != self._block_size:
            raise ValueError(
                f"cache_block needs a full block of {self._block_size} tokens, got {len(token_ids)}"
            )
        current = self._block_hash[block_id]
        if current is not None:
            if current == block_hash:
                return
            raise ValueError(
                f"KV block {block_id} already cached under hash {current:#x}, not {block_hash:#x}"
            )
        if block_hash in self._hash_to_block:
            return
        self._hash_to_block[block_hash] = block_id
        self._block_hash[block_id] = block_hash
        if self.on_event is not None:
            self.on_event(
                KvEvent(
                    STORED,
                    [block_hash],
                    parent_hash=parent_hash,
                    token_ids=list(token_ids),
                    adapter_id=adapter_id,
                    block_size=self._block_size,
                )
            )

    def reset_prefix_cache(self) -> bool:
        """Drop the hash of every unreferenced cached block.

        If no cached block is referenced: everything cached is dropped, one
        "cleared" event is emitted, returns True. Otherwise the unreferenced ones
        are dropped with one "removed" event (so the KV index stays exact), the
        referenced ones stay cached, and it returns False: call again once those
        sequences have finished.
        """
        if not self.enable_prefix_caching:
            return True
        dropped: list[int] = []
        for b in self._evictable:
            h = self._block_hash[b]
            self._block_hash[b] = None
            del self._hash_to_block[h]  # type: ignore[arg-type]
            dropped.append(h)  # type: ignore[arg-type]
            self._free.append(b)
        self._evictable.clear()
        ok = not self._hash_to_block
        if self.on_event is not None:
            if ok:
                self.on_event(KvEvent(CLEARED, [], block_size=self._block_size))
            elif dropped:
                self.on_event(KvEvent(REMOVED, dropped, block_size=self._block_size))
        return ok

    # ------------------------------------------------------------------ checks
    def check_invariants(self) -> None:
        """Raise AssertionError if any internal invariant is broken (O(num_blocks))."""
        n = self._num_blocks
        free_set = set(self._free)
        assert len(free_set) == len(self._free), "duplicate ids in free list"
        evict_set = set(self._evictable)
        assert not (free_set & evict_set), "block both free and evictable"
        for b in range(n):
            r = self._ref[b]
            assert r >= 0, f"block {b} has negative ref {r}"
            where = (r > 0) + (b in free_set) + (b in evict_set)
            assert where == 1, f"block {b} is in {where} of referenced/free/evictable (ref {r})"
            h = self._block_hash[b]
            if b in free_set:
                assert h is None, f"free block {b} still holds hash {h:#x}"
            if b in evict_set:
                assert h is not None, f"evictable block {b} holds no hash"
            if h is not None:
                assert self._hash_to_block.get(h) == b, f"hash {h:#x} of block {b} maps elsewhere"
        for h, b in self._hash_to_block.items():
            assert 0 <= b < n, f"hash {h:#x} maps to bad block {b}"
            assert self._block_hash[b] == h, f"hash map and block {b} disagree"
        n_used = sum(1 for r in self._ref if r > 0)
        assert n_used + len(free_set) + len(evict_set) == n, "counts do not add up"
        assert n_used == self.num_used_blocks
        assert self.num_free_blocks + self.num_used_blocks == n
        if not self.enable_prefix_caching:
            assert not self._hash_to_block and not self._evictable

    def __repr__(self) -> str:
        return (
            f"BlockAllocator(num_blocks={self._num_blocks}, block_size={self._block_size}, "
            f"used={self.num_used_blocks}, free={len(self._free)}, "
            f"evictable={len(self._evictable)}, cached={len(self._hash_to_block)})"
        )
