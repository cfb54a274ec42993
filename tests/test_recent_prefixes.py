"""The router's memory of prefixes it just routed (predicted overlap before KV events land)."""
from router.recent_prefixes import RecentPrefixes, merge_matches


def test_leading_match_within_ttl():
    r = RecentPrefixes(ttl_s=5.0)
    r.record("w1", [1, 2, 3], now=100.0)
    assert r.match([1, 2, 3, 4], now=101.0) == {"w1": 3}
    assert r.match([1, 9, 3], now=101.0) == {"w1": 1}
    assert r.match([7, 1, 2], now=101.0) == {}
    assert r.match([1, 2], now=106.0) == {}          # expired


def test_a_later_decision_moves_the_prefix_and_the_chain_stays_on_one_worker():
    r = RecentPrefixes()
    r.record("w1", [1, 2, 3], now=0.0)
    r.record("w2", [1, 2], now=1.0)
    assert r.match([1, 2, 3], now=1.5) == {"w2": 2}


def test_bounded_size_drops_oldest():
    r = RecentPrefixes(max_hashes=3)
    r.record("w1", [1, 2, 3, 4], now=0.0)
    assert r.match([1], now=0.0) == {} and r.match([2, 3, 4], now=0.0) == {"w1": 3}


def test_merge_takes_the_longer_overlap_per_worker():
    assert merge_matches({"a": 2, "b": 5}, {"a": 4, "c": 1}) == {"a": 4, "b": 5, "c": 1}
