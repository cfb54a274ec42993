import pytest

from kv_manager.block_hash import block_hashes
from kv_manager.events import CLEARED, REMOVED, STORED, KvEvent
from kv_manager.index import KvIndex


def stored(*hs):
    return KvEvent(STORED, list(hs))


def test_stored_removed_cleared_two_workers():
    idx = KvIndex()
    idx.apply("w1", stored(1, 2, 3))
    idx.apply("w2", stored(1, 2))
    assert idx.workers() == ["w1", "w2"]
    assert idx.num_blocks("w1") == 3 and idx.num_blocks("w2") == 2
    assert idx.match([1, 2, 3, 4]) == {"w1": 3, "w2": 2}

    idx.apply("w1", KvEvent(REMOVED, [2]))
    assert idx.num_blocks("w1") == 2
    assert idx.match([1, 2, 3]) == {"w1": 1, "w2": 2}

    idx.apply("w2", KvEvent(CLEARED, []))
    assert idx.num_blocks("w2") == 0
    assert idx.workers() == ["w1", "w2"]  # still known, just empty
    assert idx.match([1, 2, 3]) == {"w1": 1}
    assert len(idx) == 2  # hashes 1 and 3 (w1)


def test_duplicate_and_unknown_removals_are_harmless():
    idx = KvIndex()
    idx.apply("w1", stored(1, 1, 2))
    idx.apply("w1", stored(2))
    assert idx.num_blocks("w1") == 2
    idx.apply("w1", KvEvent(REMOVED, [7, 1, 1]))
    idx.apply("w2", KvEvent(REMOVED, [2]))  # w2 never stored 2
    assert idx.match([2]) == {"w1": 1}
    assert idx.num_blocks("w1") == 1


def test_prefix_match_stops_at_first_miss():
    idx = KvIndex()
    idx.apply("w1", stored(1, 3, 4))  # holds 1, not 2, but 3 and 4
    idx.apply("w2", stored(2, 3, 4))  # lacks the first block
    assert idx.match([1, 2, 3, 4]) == {"w1": 1}
    assert idx.match([2, 3, 4]) == {"w2": 3}
    assert idx.match([9, 1]) == {}
    assert idx.match([]) == {}


def test_match_with_real_chained_hashes():
    toks = list(range(100))
    hs = block_hashes(toks, 16)  # 6 blocks
    other = block_hashes(toks[:32] + [7] * 68, 16)
    idx = KvIndex()
    idx.apply("a", KvEvent(STORED, hs[:4]))
    idx.apply("b", KvEvent(STORED, other))
    idx.apply("c", KvEvent(STORED, hs))
    assert idx.match(hs) == {"a": 4, "b": 2, "c": 6}
    assert idx.match(block_hashes(toks, 16, adapter_id="lora")) == {}


def test_remove_worker():
    idx = KvIndex()
    idx.apply("w1", stored(1, 2))
    idx.apply("w2", stored(1, 2))
    idx.remove_worker("w1")
    idx.remove_worker("nope")
    assert idx.workers() == ["w2"]
    assert idx.num_blocks("w1") == 0
    assert idx.match([1, 2]) == {"w2": 2}
    idx.remove_worker("w2")
    assert idx.match([1, 2]) == {} and len(idx) == 0 and idx.workers() == []


def test_unknown_kind_rejected():
    with pytest.raises(ValueError):
        KvIndex().apply("w", KvEvent("bogus", [1]))


def test_index_mirrors_allocator_events():
    from kv_manager.block_allocator import BlockAllocator

    idx = KvIndex()
    alloc = BlockAllocator(4, 4, on_event=lambda e: idx.apply("w", e))
    toks = list(range(16))
    hs = block_hashes(toks, 4)
    blocks = alloc.allocate(4)
    parent = None
    for i, (b, h) in enumerate(zip(blocks, hs)):
        alloc.cache_block(b, h, parent, toks[4 * i:4 * i + 4])
        parent = h
    assert idx.match(hs) == {"w": 4}
    alloc.free(blocks)
    alloc.allocate(1)  # evicts the tail block
    assert idx.match(hs) == {"w": 3}
    assert alloc.reset_prefix_cache()
    assert idx.match(hs) == {} and idx.num_blocks("w") == 0
