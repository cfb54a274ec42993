"""Pipelined steps: the batcher plans step N+1 before step N's tokens are known (batcher/service.py).

The scheduler counts the tokens in flight as pending, so planning ahead must give exactly the
outputs of planning step by step: same greedy tokens, same finish reasons (EOS, stop strings,
max_tokens), through chunked prefill and preemption, and every block back at the end.
"""
from __future__ import annotations

import pytest

from batcher.engine import Engine
from batcher.step_timing import StepTimer
from tests.pipelined import drive
from workers.engine import EngineConfig, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,",
           "List three primary colors:", "1, 2, 3, 4, 5,", "Q: What is the boiling point of water?\nA:"]


def params() -> list[SamplingParams]:
    return [SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=[30]),   # "." ends it
            SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True),      # ends on max_tokens early
            SamplingParams(max_tokens=24, temperature=0.0, stop=["wizard"]),     # stop string
            SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
            SamplingParams(max_tokens=12, temperature=0.7, seed=7, ignore_eos=True),
            SamplingParams(max_tokens=1, temperature=0.0)]


def make(smollm2, **kw) -> Engine:
    return Engine(smollm2, EngineConfig(**{"num_kv_blocks": 256, "max_num_batched_tokens": 256,
                                           "enable_prefix_caching": False, **kw}))


def run(eng: Engine, depth: int, sps: list[SamplingParams] | None = None) -> list[tuple[list[int], str, str]]:
    """Drive the engine core the way the batcher drives a worker: up to `depth` plans queued."""
    ids = [eng.add_request(p, sp) for p, sp in zip(PROMPTS, sps or params())]
    toks = {r: [] for r in ids}
    text = {r: "" for r in ids}
    reason = {}
    core = eng.core
    for step in drive(core, eng.runner.execute, depth):
        for o in step:
            toks[o.request_id] += o.new_token_ids
            text[o.request_id] += o.new_text
            if o.finished:
                reason[o.request_id] = o.finish_reason
    eng.runner.execute(core.schedule())   # the last forgets
    return [(toks[r], text[r], reason[r]) for r in ids]


@pytest.mark.parametrize("kw", [{}, {"max_num_batched_tokens": 7}], ids=["plain", "chunked"])
def test_planning_ahead_equals_step_by_step(smollm2, kw):
    want = run(make(smollm2, **kw), depth=1)
    eng = make(smollm2, **kw)
    got = run(eng, depth=2)
    assert got == want
    assert {r for _, _, r in got} == {"length", "stop"}
    assert eng.allocator.num_free_blocks == eng.allocator.num_blocks


def test_planning_ahead_through_preemptions(smollm2):
    # 14 blocks of 4 tokens for six 24-token generations: running requests are preempted (some
    # with a token still in flight) and recomputed
    sps = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)] * len(PROMPTS)
    want = run(make(smollm2, num_kv_blocks=14, block_size=4), 1, sps)
    eng = make(smollm2, num_kv_blocks=14, block_size=4)
    assert run(eng, 2, sps) == want
    assert eng.stats().num_preemptions >= 3
    assert eng.allocator.num_free_blocks == eng.allocator.num_blocks


def test_no_step_past_max_tokens_is_planned(smollm2):
    eng = make(smollm2)
    eng.add_request("hello", SamplingParams(max_tokens=1, temperature=0.0))
    first = eng.core.schedule()
    assert first.num_tokens > 0
    second = eng.core.schedule()          # the only token is still in flight
    assert second.is_empty


def test_step_timer_sends_just_before_the_predicted_end():
    t = StepTimer(lead_fraction=0.1, lead_min_s=0.002)
    assert t.send_next_at(10.0, 8) is None                  # shape never seen: wait for the result
    t.observe(8, 0.100)
    assert t.send_next_at(10.0, 8) == pytest.approx(10.0 + 0.100 - 0.010)
    t.observe(8, 0.050)
    assert t.predict_s(8) == pytest.approx(0.075)           # the median of what it has
    t.observe(8, 0.052)
    t.observe(8, 0.160)                                     # one slow step does not move it
    assert t.predict_s(8) == pytest.approx(0.076)
    for _ in range(5):
        t.observe(8, 0.030)                                 # only the last 5 count
    assert t.predict_s(8) == pytest.approx(0.030)
    t.observe(1, 0.010)
    assert t.send_next_at(0.0, 1) == pytest.approx(0.010 - 0.002)   # the floor on the lead
