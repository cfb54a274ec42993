"""Arrival schedules, workloads and the routing policies the routing benchmark switches between."""
from __future__ import annotations

import statistics

import pytest

from bench import loadgen, workloads
from bench.metrics import RequestRecord
from router.routing import Candidate, RoundRobin, choose


def test_poisson_is_seeded_and_has_the_rate():
    a = loadgen.poisson_times(2000, 4.0, seed=1)
    assert a == loadgen.poisson_times(2000, 4.0, seed=1)
    assert a != loadgen.poisson_times(2000, 4.0, seed=2)
    assert a[0] == 0.0 and all(x < y for x, y in zip(a, a[1:]))
    gaps = [y - x for x, y in zip(a, a[1:])]
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.08)
    assert statistics.pstdev(gaps) == pytest.approx(0.25, rel=0.12)      # exponential: sd = mean


def test_gamma_burstiness_keeps_the_mean_and_changes_the_spread():
    bursty = loadgen.gamma_times(3000, 2.0, burstiness=0.25, seed=0)
    regular = loadgen.gamma_times(3000, 2.0, burstiness=4.0, seed=0)
    gb = [y - x for x, y in zip(bursty, bursty[1:])]
    gr = [y - x for x, y in zip(regular, regular[1:])]
    assert statistics.fmean(gb) == pytest.approx(0.5, rel=0.15)
    assert statistics.fmean(gr) == pytest.approx(0.5, rel=0.05)
    # coefficient of variation of a gamma is 1/sqrt(shape): 2.0 vs 0.5
    assert statistics.pstdev(gb) / statistics.fmean(gb) > 1.5
    assert statistics.pstdev(gr) / statistics.fmean(gr) < 0.7


def test_spike_profile_is_ten_times_the_base_during_the_spike():
    t = loadgen.spike_times(2.0, 10.0, before_s=50, spike_s=20, after_s=50, seed=3)
    before = sum(1 for x in t if x < 50)
    during = sum(1 for x in t if 50 <= x < 70)
    after = sum(1 for x in t if x >= 70)
    assert before / 50 == pytest.approx(2.0, rel=0.25)
    assert during / 20 == pytest.approx(20.0, rel=0.15)
    assert after / 50 == pytest.approx(2.0, rel=0.25)
    assert max(t) < 120


def test_timeline_bins_offered_served_rejected():
    recs = [RequestRecord(0, 0.2, sent=100.2, done=100.9, chunks=[(100.5, 1)]),
            RequestRecord(1, 0.7, sent=100.7, done=101.5, chunks=[(101.0, 1)]),
            RequestRecord(2, 1.1, sent=101.1, done=101.2, error="RESOURCE_EXHAUSTED")]
    tl = loadgen.timeline(recs, 100.0, 1.0, [(0.5, 3, 1)])
    assert tl["offered"] == [2, 1] and tl["served"] == [1, 1] and tl["rejected"] == [0, 1]
    assert tl["queue"]["waiting"] == [3]


class _Tok:
    """Enough tokenizer for the workloads: one token per character."""

    def encode(self, s):
        return [ord(c) for c in s]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_synthetic_lengths_are_seeded_and_in_range():
    a = workloads.synthetic(_Tok(), 50, "10-20", "3-5", seed=7)
    assert [(s.prompt, s.max_tokens) for s in a] == [(s.prompt, s.max_tokens)
                                                     for s in workloads.synthetic(_Tok(), 50, "10-20", "3-5", seed=7)]
    assert all(10 <= len(s.prompt) <= 20 and 3 <= s.max_tokens <= 5 for s in a)
    assert workloads.parse_range("8") == (8, 8)
    with pytest.raises(ValueError):
        workloads.parse_range("9-3")


def test_shared_prefix_is_n_prompts_by_m_questions():
    specs = workloads.shared_prefix(_Tok(), num_prefixes=3, questions_per_prefix=4, prefix_len=50, seed=1)
    assert len(specs) == 12
    groups = {s.group for s in specs}
    assert groups == {"prefix0", "prefix1", "prefix2"}
    for g in groups:
        prompts = [s.prompt for s in specs if s.group == g]
        prefix = prompts[0].split("Question:")[0]
        assert len(prefix) > 50 and all(p.startswith(prefix) for p in prompts) and len(set(prompts)) == 4


def test_chat_prompt_set():
    specs = workloads.chat()
    assert len(specs) >= 30
    assert all(s.messages and s.messages[-1]["role"] == "user" and s.max_tokens > 0 for s in specs)
    short = workloads.chat(10, output_scale=0.1, max_output=8, seed=2)
    assert len(short) == 10 and all(1 <= s.max_tokens <= 8 for s in short)


def test_routing_policies():
    cands = [Candidate("w1", matched_blocks=8, load=3), Candidate("w0", matched_blocks=0, load=1)]
    assert choose(cands, 10).worker_id == "w1"                      # kv: 2 + 3 < 10 + 1
    assert choose(cands, 10, policy="least_loaded").worker_id == "w0"
    rr = RoundRobin()
    assert [choose(cands, 10, policy="round-robin", rr=rr).worker_id for _ in range(4)] == ["w0", "w1", "w0", "w1"]
    with pytest.raises(ValueError):
        choose(cands, 10, policy="random")


def test_config_routing_policy():
    from common.config import load_config
    assert load_config(None).routing_policy == "kv"
    assert load_config(None, routing_policy="Round-Robin").routing_policy == "round_robin"
    with pytest.raises(ValueError):
        load_config(None, routing_policy="fastest")
