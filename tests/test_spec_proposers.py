"""Model-free draft proposers: prompt lookup (the request's own context) and the suffix cache (past outputs)."""
import numpy as np

from batcher.prompt_lookup import propose_from_context
from batcher.suffix_cache import SuffixCache


def test_prompt_lookup_continues_a_span_quoted_from_the_prompt():
    prompt = [5, 6, 7, 8, 9, 10, 11, 12]
    out = prompt + [1, 2, 7, 8]                 # the output starts quoting "7 8 ..."
    assert propose_from_context(np.array(out), 3).tolist() == [9, 10, 11]


def test_prompt_lookup_prefers_the_longest_then_the_latest_match():
    # "3 4" occurs twice; only the later occurrence is preceded by 2, so the 3-gram "2 3 4" picks it
    seq = [3, 4, 50, 2, 3, 4, 60, 61, 9, 2, 3, 4]
    assert propose_from_context(np.array(seq), 2, max_ngram=3).tolist() == [60, 61]
    # with bigrams only, the latest "3 4" (index 4) wins as well
    assert propose_from_context(np.array(seq), 2, max_ngram=2).tolist() == [60, 61]


def test_prompt_lookup_without_a_match_proposes_nothing():
    assert propose_from_context(np.array([1, 2, 3, 4, 5]), 4).size == 0
    assert propose_from_context(np.array([1]), 4).size == 0
    assert propose_from_context(np.array([1, 2, 1, 2]), 0).size == 0


def test_prompt_lookup_stops_at_the_end_of_the_context():
    assert propose_from_context(np.array([7, 8, 9, 7, 8]), 5).tolist() == [9, 7, 8]


def test_suffix_cache_follows_the_most_frequent_continuation():
    cache = SuffixCache(capacity=8, depth=8)
    for _ in range(3):
        cache.add([1, 2, 3, 4, 5])
    cache.add([1, 2, 3, 9, 9])
    assert cache.propose([7, 1, 2, 3], 4) == [4, 5]
    assert cache.propose([7, 7, 7], 4) == []


def test_suffix_cache_stops_drafting_at_a_fork():
    cache = SuffixCache(capacity=8, depth=8, min_share=0.6)
    cache.add([1, 2, 3, 4])
    cache.add([1, 2, 3, 5])
    # after "1 2 3" the children 4 and 5 each hold half the windows: below min_share, no draft
    assert cache.propose([1, 2, 3], 4) == []
    assert cache.propose([1, 2], 4) == [3]


def test_suffix_cache_forgets_evicted_sequences():
    cache = SuffixCache(capacity=2, depth=6)
    cache.add([1, 2, 3, 4])
    cache.add([5, 6, 7, 8])
    cache.add([9, 10, 11, 12])      # evicts the first
    assert len(cache) == 2
    assert cache.propose([1, 2], 2) == []
    assert cache.propose([5, 6], 2) == [7, 8]
    # the evicted windows are deleted, not left at count 0
    assert 1 not in cache._root.children
