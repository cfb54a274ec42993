from collections import Counter

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from kv_manager.block_allocator import BlockAllocator
from kv_manager.block_hash import block_hashes
from kv_manager.events import CLEARED, REMOVED, STORED, KvEvent
from kv_manager.index import KvIndex

BS = 4


def snapshot(a: BlockAllocator):
    return (list(a._ref), list(a._free), list(a._evictable), dict(a._hash_to_block),
            list(a._block_hash))


def fill_and_cache(a: BlockAllocator, toks, adapter_id=None, prefix=()):
    """Allocate a sequence for toks reusing `prefix` blocks, cache its full blocks."""
    hs = block_hashes(toks, a.block_size, adapter_id)
    need = -(-len(toks) // a.block_size) - len(prefix)
    fresh = a.allocate(need, prefix)
    assert fresh is not None
    blocks = list(prefix) + fresh
    parent = None
    for i, h in enumerate(hs):
        a.cache_block(blocks[i], h, parent, toks[i * BS:(i + 1) * BS], adapter_id)
        parent = h
    return blocks, hs


def test_allocate_and_free():
    a = BlockAllocator(8, BS)
    assert a.num_free_blocks == 8 and a.num_used_blocks == 0 and a.usage == 0.0
    b = a.allocate(3)
    assert b == [0, 1, 2]
    assert all(a.ref_count(x) == 1 for x in b)
    assert a.num_free_blocks == 5 and a.num_used_blocks == 3 and a.usage == 3 / 8
    a.check_invariants()
    a.free(b)
    assert a.num_free_blocks == 8 and a.num_used_blocks == 0
    assert a.allocate(0) == []
    a.check_invariants()


def test_exhausted_returns_none_and_changes_nothing():
    a = BlockAllocator(4, BS)
    toks = list(range(8))
    blocks, hs = fill_and_cache(a, toks)
    a.free(blocks)  # 2 evictable + 2 free
    held = a.allocate(1)  # from free list
    before = snapshot(a)
    # 3 free-able blocks left (1 free + 2 evictable); reviving the 2-block prefix
    # leaves only 1 fresh, so asking for 2 must fail with no change at all.
    assert a.allocate(2, a.match_prefix(hs)) is None
    assert snapshot(a) == before
    assert a.allocate(4) is None
    assert snapshot(a) == before
    assert a.allocate(1, a.match_prefix(hs)) is not None
    a.check_invariants()
    assert held


def test_free_list_used_before_evicting():
    events = []
    a = BlockAllocator(4, BS, on_event=events.append)
    blocks, _ = fill_and_cache(a, list(range(4)))
    a.free(blocks)
    events.clear()
    assert a.allocate(3) == [1, 2, 3]
    assert a.is_cached(0) and not events
    assert a.allocate(1) == [0]
    assert not a.is_cached(0) and [e.kind for e in events] == [REMOVED]


def test_prefix_match_and_share():
    a = BlockAllocator(10, BS)
    toks = list(range(10))  # 2 full blocks + 2 tokens
    blocks, hs = fill_and_cache(a, toks)
    assert a.num_cached_blocks == 2 and not a.is_cached(blocks[2])
    assert a.match_prefix(hs) == blocks[:2]
    assert a.match_prefix([hs[0], 12345, hs[1]]) == blocks[:1]
    assert a.match_prefix([12345] + hs) == []
    # match_prefix is read only
    assert a.ref_count(blocks[0]) == 1
    # second sequence sharing the prefix
    toks2 = toks[:8] + [99, 98, 97]
    prefix = a.match_prefix(block_hashes(toks2, BS))
    assert prefix == blocks[:2]
    fresh = a.allocate(1, prefix)
    assert fresh is not None and fresh[0] not in blocks
    assert a.ref_count(blocks[0]) == 2 and a.ref_count(blocks[1]) == 2
    assert a.num_used_blocks == 4
    a.free(blocks)
    assert a.ref_count(blocks[0]) == 1 and a.num_used_blocks == 3
    a.free(prefix + fresh)
    assert a.num_free_blocks == 10 and a.num_cached_blocks == 2
    a.check_invariants()
    # revive evictable prefix
    again = a.match_prefix(hs)
    assert again == blocks[:2]
    assert a.allocate(0, again) == []
    assert a.ref_count(blocks[0]) == 1 and a.num_evictable_blocks == 0
    a.check_invariants()


def test_adapter_isolates_prefix():
    a = BlockAllocator(8, BS)
    toks = list(range(8))
    fill_and_cache(a, toks, adapter_id="lora-a")
    assert a.match_prefix(block_hashes(toks, BS)) == []
    assert a.match_prefix(block_hashes(toks, BS, "lora-b")) == []
    assert len(a.match_prefix(block_hashes(toks, BS, "lora-a"))) == 2


def test_lru_eviction_order_and_reverse_free():
    events = []
    a = BlockAllocator(6, BS, on_event=events.append)
    s1, h1 = fill_and_cache(a, list(range(0, 12)))  # blocks 0,1,2
    s2, h2 = fill_and_cache(a, list(range(100, 112)))  # blocks 3,4,5
    a.free(s1)  # LRU now: 2,1,0 (tail first)
    a.free(s2)  # then 5,4,3
    assert list(a._evictable) == [2, 1, 0, 5, 4, 3]
    events.clear()
    got = a.allocate(2)
    assert got == [2, 1]
    assert events == [KvEvent(REMOVED, [h1[2], h1[1]], block_size=BS)]
    # s1's head is still cached and reusable
    assert a.match_prefix(h1) == [0]
    # reviving a block removes it from the LRU; the rest keep their order
    a.allocate(0, [0])
    assert list(a._evictable) == [5, 4, 3]
    a.free([0])  # most recently used now
    assert list(a._evictable) == [5, 4, 3, 0]
    assert a.allocate(4) == [5, 4, 3, 0]
    assert a.num_cached_blocks == 0
    a.check_invariants()


def test_events_emitted():
    events = []
    a = BlockAllocator(4, BS, on_event=events.append)
    toks = list(range(8))
    blocks, hs = fill_and_cache(a, toks, adapter_id="ad")
    assert events == [
        KvEvent(STORED, [hs[0]], None, toks[:4], "ad", BS),
        KvEvent(STORED, [hs[1]], hs[0], toks[4:8], "ad", BS),
    ]
    events.clear()
    a.cache_block(blocks[0], hs[0], None, toks[:4], "ad")  # same block, same hash: no-op
    assert events == []
    # a hash already held by another block: this block stays uncached, no event
    (other,) = a.allocate(1)
    a.cache_block(other, hs[0], None, toks[:4], "ad")
    assert not a.is_cached(other) and events == []
    a.free([other])
    assert a.num_free_blocks == 2 and not a.is_cached(other)
    a.free(blocks)
    a.allocate(4)
    assert events == [KvEvent(REMOVED, [hs[1], hs[0]], block_size=BS)]


def test_cache_block_guards():
    a = BlockAllocator(4, BS)
    (b,) = a.allocate(1)
    with pytest.raises(ValueError):
        a.cache_block(b, 1, None, [1, 2, 3])  # not full
    with pytest.raises(ValueError):
        a.cache_block(3, 1, None, [1, 2, 3, 4])  # unreferenced
    a.cache_block(b, 1, None, [1, 2, 3, 4])
    with pytest.raises(ValueError):
        a.cache_block(b, 2, None, [1, 2, 3, 4])  # re-cached under another hash
    a.check_invariants()


def test_double_free_raises_without_change():
    a = BlockAllocator(4, BS)
    b = a.allocate(2)
    a.free(b[:1])
    before = snapshot(a)
    with pytest.raises(ValueError):
        a.free(b)  # b[0] already at ref 0
    with pytest.raises(ValueError):
        a.free([b[1], b[1]])
    assert snapshot(a) == before
    a.check_invariants()


def test_stale_prefix_raises():
    a = BlockAllocator(4, BS)
    with pytest.raises(ValueError):
        a.allocate(1, [0])
    assert a.num_free_blocks == 4


def test_reset_prefix_cache():
    events = []
    a = BlockAllocator(8, BS, on_event=events.append)
    s1, h1 = fill_and_cache(a, list(range(8)))
    s2, h2 = fill_and_cache(a, list(range(50, 58)))
    a.free(s1)
    events.clear()
    assert a.reset_prefix_cache() is False  # s2's blocks still referenced
    assert events == [KvEvent(REMOVED, [h1[1], h1[0]], block_size=BS)]
    assert a.match_prefix(h1) == [] and a.match_prefix(h2) == s2
    a.check_invariants()
    a.free(s2)
    events.clear()
    assert a.reset_prefix_cache() is True
    assert events == [KvEvent(CLEARED, [], block_size=BS)]
    assert a.num_cached_blocks == 0 and a.num_free_blocks == 8
    a.check_invariants()


def test_caching_disabled():
    events = []
    a = BlockAllocator(4, BS, enable_prefix_caching=False, on_event=events.append)
    b = a.allocate(2)
    hs = block_hashes(list(range(8)), BS)
    a.cache_block(b[0], hs[0], None, list(range(4)))
    assert not a.is_cached(b[0]) and a.match_prefix(hs) == [] and events == []
    a.free(b)
    assert a.num_evictable_blocks == 0 and a.reset_prefix_cache()
    a.check_invariants()


def test_check_invariants_detects_corruption():
    a = BlockAllocator(4, BS)
    a.allocate(1)
    a._free.append(0)  # block 0 is referenced and on the free list
    with pytest.raises(AssertionError):
        a.check_invariants()


# ----------------------------------------------------------------- stateful test

NUM_BLOCKS = 16
VOCAB = 3


class AllocatorMachine(RuleBasedStateMachine):
    """Model: live sequences with their tokens and block tables; `content` records
    which tokens each block holds, so reusing a cached block is checked to be
    reusing the right KV, not just a valid id."""

    seqs = Bundle("seqs")

    @initialize()
    def setup(self):
        self.index = KvIndex()
        self.events: list[KvEvent] = []

        def on_event(e):
            self.events.append(e)
            self.index.apply("w", e)

        self.a = BlockAllocator(NUM_BLOCKS, BS, on_event=on_event)
        self.live: dict[int, dict] = {}
        self.content: dict[int, tuple] = {}  # block id -> tokens written there
        self.next_id = 0
        self.history: list[tuple[list[int], str | None]] = []

    def _write(self, seq, start_block):
        toks = seq["tokens"]
        for i in range(start_block, len(seq["blocks"])):
            self.content[seq["blocks"][i]] = tuple(toks[i * BS:(i + 1) * BS])

    @rule(target=seqs, suffix=st.lists(st.integers(0, VOCAB - 1), max_size=3 * BS),
          base=st.one_of(st.none(), st.integers(0, 1000)), keep=st.integers(0, 4 * BS),
          adapter=st.sampled_from([None, None, "a"]), use_cache=st.booleans(),
          cache_now=st.booleans())
    def new_seq(self, suffix, base, keep, adapter, use_cache, cache_now):
        # often re-send (part of) an earlier prompt so prefixes actually repeat
        if base is not None and self.history:
            btoks, badapter = self.history[base % len(self.history)]
            toks, adapter = btoks[:keep] + suffix, badapter
        else:
            toks = suffix
        if not toks:
            return multiple()
        self.history.append((list(toks), adapter))
        hs = block_hashes(toks, BS, adapter)
        prefix = self.a.match_prefix(hs) if use_cache else []
        for i, b in enumerate(prefix):  # a hit must hold exactly these tokens
            assert self.content[b] == tuple(toks[i * BS:(i + 1) * BS])
            assert self.a.block_hash(b) == hs[i]
        need = -(-len(toks) // BS) - len(prefix)
        before = snapshot(self.a)
        # reviving evictable prefix blocks uses up free capacity: one more than
        # what is left after that must fail, atomically
        avail = self.a.num_free_blocks - sum(1 for b in set(prefix) if self.a.ref_count(b) == 0)
        assert self.a.allocate(avail + 1, prefix) is None
        assert snapshot(self.a) == before
        fresh = self.a.allocate(need, prefix)
        if fresh is None:
            assert snapshot(self.a) == before
            revived = sum(1 for b in prefix if self.a.ref_count(b) == 0)
            assert need > self.a.num_free_blocks - revived
            return multiple()  # nothing added to the bundle
        seq = {"tokens": list(toks), "blocks": list(prefix) + fresh, "adapter": adapter,
               "hashes": hs, "cached": len(prefix), "id": self.next_id}
        self.next_id += 1
        self._write(seq, len(prefix))
        self.live[seq["id"]] = seq
        if cache_now:  # as the batcher does once prefill has written the blocks
            self.cache_full_blocks(seq["id"])
        return seq["id"]

    @rule(sid=seqs, n=st.integers(1, BS), tok=st.integers(0, VOCAB - 1))
    def append(self, sid, n, tok):
        seq = self.live.get(sid)
        if seq is None:
            return
        toks = seq["tokens"]
        capacity = len(seq["blocks"]) * BS
        new = [tok] * n
        if len(toks) + n > capacity:
            before = snapshot(self.a)
            fresh = self.a.allocate(1)
            if fresh is None:
                assert snapshot(self.a) == before and self.a.num_free_blocks == 0
                return
            seq["blocks"] += fresh
        # tokens go into blocks that are not cached (cached blocks are full)
        first_touched = len(toks) // BS
        assert first_touched >= seq["cached"]
        assert not any(self.a.is_cached(b) for b in seq["blocks"][first_touched:])
        toks += new
        self._write(seq, first_touched)
        seq["hashes"] = block_hashes(toks, BS, seq["adapter"])

    @rule(sid=seqs)
    def cache_full_blocks(self, sid):
        seq = self.live.get(sid)
        if seq is None:
            return
        hs = seq["hashes"]
        for i in range(seq["cached"], len(hs)):
            b = seq["blocks"][i]
            parent = hs[i - 1] if i else None
            owner = self.a.lookup(hs[i])
            self.a.cache_block(b, hs[i], parent, seq["tokens"][i * BS:(i + 1) * BS],
                               seq["adapter"])
            assert self.a.is_cached(b) == (owner is None or owner == b)
        seq["cached"] = len(hs)

    @rule(sid=consumes(seqs))
    def free_seq(self, sid):
        seq = self.live.pop(sid, None)
        if seq is None:
            return
        self.a.free(seq["blocks"])

    @precondition(lambda self: not self.live)
    @rule(go=st.integers(0, 19))
    def reset(self, go):
        if go != 13:  # rarely: a reset wipes the cache the other rules build up
            return
        assert self.a.reset_prefix_cache() is True
        assert self.a.num_cached_blocks == 0

    @invariant()
    def consistent(self):
        if not hasattr(self, "a"):
            return
        self.a.check_invariants()
        owners = Counter(b for s in self.live.values() for b in s["blocks"])
        for b in range(NUM_BLOCKS):
            assert self.a.ref_count(b) == owners.get(b, 0)
        for b, n in owners.items():
            if n > 1:  # shared only via the prefix cache
                assert self.a.is_cached(b)
                for s in self.live.values():
                    if b in s["blocks"]:
                        assert s["blocks"].index(b) < s["cached"]
        # the KV index fed by events sees exactly what is cached
        cached = set(self.a._hash_to_block)
        assert set(self.index._by_worker.get("w", set())) == cached

    def teardown(self):
        if not hasattr(self, "a"):
            return
        for sid in list(self.live):
            self.a.free(self.live.pop(sid)["blocks"])
        self.a.check_invariants()
        assert self.a.num_free_blocks == NUM_BLOCKS
        assert self.a.num_used_blocks == 0


AllocatorMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, derandomize=True, deadline=None,
    database=None,
)
TestAllocatorMachine = AllocatorMachine.TestCase
