"""Defaults chosen from the machine (issue 19 item 6): the thread / budget / window choices on
injected timings (deterministic), which keys are the tuner's, and one real measurement on a model."""
from __future__ import annotations

from dataclasses import replace

import pytest

from common.config import StackConfig
from workers import tuning as T
from workers.engine.config import EngineConfig
from workers.tuning import ThreadTiming, Tuning, choose_budget, choose_threads, choose_window, decide, fit_prefill


def test_thread_candidates_leave_cores_when_few():
    assert T.thread_candidates(2, 1) == [1, 2]
    assert T.thread_candidates(2, 2) == [1]
    assert T.thread_candidates(4, 1) == [1, 2, 3, 4]
    assert T.thread_candidates(16, 1) == [8, 15, 16]
    assert T.thread_candidates(16, 4) == [1, 2, 3, 4]


def test_fewer_threads_win_unless_more_are_clearly_faster():
    # 2 cores: 2 threads 20% faster is not enough (the services need the other core)
    n, why = choose_threads([ThreadTiming(1, 12.0), ThreadTiming(2, 10.0)], cores=2)
    assert n == 1 and "within 25% of the fastest (2)" in why and "1 of 2 cores" in why
    # ... 40% faster is
    n, why = choose_threads([ThreadTiming(1, 14.0), ThreadTiming(2, 10.0)], cores=2)
    assert n == 2 and "fastest" in why and "1: 14.0 ms, 2: 10.0 ms" in why
    # oversubscribed: more threads are slower
    assert choose_threads([ThreadTiming(1, 25.0), ThreadTiming(2, 177.0)], cores=2)[0] == 1
    # many cores: a 10% margin
    assert choose_threads([ThreadTiming(8, 10.8), ThreadTiming(16, 10.0)], cores=16)[0] == 8
    assert choose_threads([ThreadTiming(8, 11.5), ThreadTiming(16, 10.0)], cores=16)[0] == 16


def test_budget_keeps_a_step_under_the_target():
    assert fit_prefill({16: 14.0, 64: 50.0}) == pytest.approx((2.0, 0.75))
    n, why = choose_budget({16: 14.0, 64: 50.0}, 50.0, 16, 64)
    assert n == 64 and 2.0 + 0.75 * n <= 50.0 and "under the 50 ms step target" in why
    # a fast machine: a larger budget, still a block multiple
    n, _ = choose_budget({16: 3.0, 64: 6.0}, 50.0, 16, 64)
    assert n == 768 and n % 16 == 0 and 2.0 + 0.0625 * n <= 50.0
    # a slow one: the floor (a decode token per seat, up to 32), said so
    n, why = choose_budget({16: 60.0, 64: 200.0}, 50.0, 16, 64)
    assert n == 32 and why.startswith("32 tokens, the floor") and "over the 50 ms" in why
    assert choose_budget({16: 60.0, 64: 200.0}, 50.0, 16, 8)[0] == 16
    # noise (the bigger chunk timed faster) falls back to the average per token, never a negative slope
    a, b = fit_prefill({16: 30.0, 64: 20.0})
    assert b > 0 and a >= 0
    # a very fast machine is capped
    assert choose_budget({16: 0.1, 64: 0.2}, 50.0, 16, 64)[0] == 8192


def test_window_is_a_quarter_step_between_1_and_5_ms():
    assert choose_window(8.0)[0] == 2.0
    assert choose_window(2.0)[0] == 1.0
    assert choose_window(40.0)[0] == 5.0


def test_decide_tunes_only_the_wanted_keys_at_the_chosen_threads():
    timings = [ThreadTiming(1, 12.0, {16: 14.0, 64: 50.0}), ThreadTiming(2, 10.0, {16: 7.0, 64: 25.0})]
    everything = dict(num_threads=True, max_num_batched_tokens=True, admission_window_ms=True)
    t = decide(timings, cores=2, workers=1, want=everything, ecfg=EngineConfig(), step_target_ms=50.0)
    assert (t.num_threads, t.max_num_batched_tokens, t.admission_window_ms) == (1, 64, 3.0)
    assert set(t.reasons) == set(everything)
    # threads set in the config: the budget is measured at those threads
    t = decide(timings, cores=2, workers=1, want=dict(max_num_batched_tokens=True), ecfg=EngineConfig(),
               step_target_ms=50.0, fixed_threads=2)
    assert (t.num_threads, t.admission_window_ms) == (None, None) and t.max_num_batched_tokens == 128
    cfg = T.apply_tuning(StackConfig(), t)
    assert (cfg.engine.num_threads, cfg.engine.max_num_batched_tokens, cfg.admission_window_ms) == (None, 128, 3.0)
    assert Tuning.from_dict(t.to_dict()) == t


def test_only_keys_left_at_their_defaults_are_tuned(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert not any(T.wanted(StackConfig()).values())                 # unset: off (tests, benchmarks)
    on = StackConfig(auto_tune=True)
    assert all(T.wanted(on).values())
    assert T.wanted(replace(on, engine=EngineConfig(num_threads=2, max_num_batched_tokens=256))) == dict(
        num_threads=False, max_num_batched_tokens=False, admission_window_ms=True)
    assert not any(T.wanted(replace(on, admission_window_ms=1.0, engine=EngineConfig(device="cuda"))).values())
    assert not any(T.wanted(replace(on, backend="triton")).values())
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert not T.wanted(on)["num_threads"]


def test_measuring_a_real_runner_times_each_candidate():
    import torch

    from workers.engine.loader import load_model
    from workers.engine.model_runner import ModelRunner
    from workers.tuning import measure
    before = torch.get_num_threads()
    runner = ModelRunner(load_model("random:tiny", seed=0), EngineConfig(num_kv_blocks=16, max_model_len=256))
    try:
        timings = measure(runner, [1, 2], budget_s=60.0)
    finally:
        torch.set_num_threads(before)
    assert [t.threads for t in timings] == [1, 2]
    assert all(t.decode_ms > 0 for t in timings)
    assert set(timings[0].prefill_ms) == {16, 64} and all(v > 0 for v in timings[0].prefill_ms.values())
    assert not runner.seqs   # every request it made up is forgotten again


def test_status_lines_say_what_was_chosen_and_why():
    from services.machine_defaults import describe
    from workers.tuning import summary
    t = decide([ThreadTiming(1, 12.0, {16: 14.0, 64: 50.0}), ThreadTiming(2, 10.0, {16: 7.0, 64: 25.0})], cores=2,
               workers=1, want=dict(num_threads=True, max_num_batched_tokens=True), ecfg=EngineConfig(),
               step_target_ms=50.0)
    t.measure_s = 0.8
    lines = describe(summary(t))
    assert lines[0] == "defaults chosen from the machine (2 cores, measured in 0.80s):"
    assert lines[1].startswith("  num_threads = 1: 1 thread(s): within 25%")
    assert lines[2].startswith("  max_num_batched_tokens = 64: 64 tokens: a step of n tokens takes 2.0 + 0.750")
    assert len(lines) == 3 and describe(None) == []
    failed = summary(Tuning(2, 1, reasons={"error": "measuring failed (worker log)"}))
    assert describe(failed)[-1] == "  none chosen: measuring failed (worker log)"
