"""Speculative decoding end to end in the in-process engine (real SmolLM2 on the CPU).

Greedy output with speculation on equals off, for every method, alone and in a mixed batch (prompts
of different lengths, one in prefill while others decode, chunked prefill under a small token budget),
and again on prefix-cache hits; sampled requests finish and repeat with their seed; a copy-heavy
prompt gets its drafts accepted (more than one token per decode step).
"""
from __future__ import annotations

import pytest

from batcher.engine import Engine
from workers.engine import EngineConfig, SamplingParams

COPY = ("def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
        "# The same two functions again:\ndef add(a, b):")
PROMPTS = [COPY, "The capital of France is", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,"]
GREEDY = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
          SamplingParams(max_tokens=6, temperature=0.0, stop=[" Paris."]),
          SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=True)]
# budget 16: the long prompt is prefilled in chunks while the others decode
BASE = {"num_kv_blocks": 96, "block_size": 8, "max_num_batched_tokens": 16, "enable_prefix_caching": True}


def make(smollm2, method="off", **kw) -> Engine:
    return Engine(smollm2, EngineConfig(**{**BASE, "speculative_method": method,
                                           "num_speculative_tokens": 4, **kw}))


@pytest.fixture(scope="module")
def reference(smollm2):
    eng = make(smollm2)
    return eng.generate(PROMPTS, GREEDY), eng.generate(PROMPTS[0], GREEDY[0])[0]


def _same(got, want):
    assert [(o.token_ids, o.text, o.finish_reason) for o in got] == \
           [(o.token_ids, o.text, o.finish_reason) for o in want]


@pytest.mark.parametrize("method", ["prompt_lookup", "suffix", "ngram", "self_draft"])
def test_greedy_speculation_equals_off(smollm2, reference, method):
    mixed, alone = reference
    eng = make(smollm2, method, speculative_adaptive=False)
    got = eng.generate(PROMPTS, GREEDY)           # mixed lengths, chunked prefill beside decodes
    _same(got, mixed)
    assert got[2].logprobs == pytest.approx(mixed[2].logprobs, abs=1e-3)
    # batch 1, on a prefix-cache hit (and, for suffix/ngram, with the first run's outputs as history)
    again = eng.generate(PROMPTS[0], GREEDY[0])
    _same(again, [alone])
    assert again[0].num_cached_tokens >= 32
    totals = eng.core.spec_totals()[method]
    assert totals.verify_rows > 0 and totals.accepted > 0
    assert sum(o.spec_accepted for o in got + again) == totals.accepted
    assert eng.allocator.num_free_blocks == eng.allocator.num_blocks


def test_overlapped_steps_with_speculation_equal_off(smollm2, reference):
    """CUDA's in-process overlap (step N+1 launched before N's tokens are read), on the CPU: a
    speculating request waits for its result while the others' decodes run ahead."""
    mixed, _ = reference
    eng = make(smollm2, "prompt_lookup", speculative_adaptive=False)
    eng.runner.overlap_steps = True
    _same(eng.generate(PROMPTS, GREEDY), mixed)
    assert eng.core.spec_totals()["prompt_lookup"].accepted > 0
    assert eng.allocator.num_free_blocks == eng.allocator.num_blocks


def test_copy_heavy_prompt_gets_drafts_accepted(smollm2):
    eng = make(smollm2, "prompt_lookup")            # adaptive, as deployed
    (out,) = eng.generate(COPY, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    assert out.spec_accepted > 0 and out.spec_proposed >= out.spec_accepted
    assert len(out.token_ids) - 1 > 1.3 * out.decode_steps         # tokens per decode step
    assert eng.core.steps_total < len(out.token_ids)


def test_sampled_requests_finish_and_repeat_with_their_seed(smollm2):
    sps = [SamplingParams(max_tokens=8, temperature=0.8, top_p=0.95, seed=7, ignore_eos=True),
           SamplingParams(max_tokens=6, temperature=1.0, seed=11, ignore_eos=True)]
    # prompt lookup's drafts depend only on the request's own tokens, so the same seed gives the same
    # drafts, the same verification draws and the same tokens, batch and cache state aside
    eng = make(smollm2, "prompt_lookup", speculative_adaptive=False)
    runs = [eng.generate(PROMPTS[:2], sps) for _ in range(2)]   # the second on prefix-cache hits
    assert [o.token_ids for o in runs[0]] == [o.token_ids for o in runs[1]]
    assert [len(o.token_ids) for o in runs[0]] == [8, 6]
    assert all(o.finish_reason == "length" for o in runs[0])
    assert eng.core.spec_totals()["prompt_lookup"].verify_rows > 0
