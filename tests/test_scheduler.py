"""Scheduler and EngineCore behaviour with a fake worker (no model): budgets, chunking,
priorities, preemption, prefix reuse, abort and finish reasons."""
from __future__ import annotations

import pytest

from batcher.engine_core import EngineCore
from batcher.scheduler import QueueFullError, Scheduler
from kv_manager.block_allocator import BlockAllocator
from workers.engine.errors import InvalidRequestError
from workers.engine.plan import StepPlan, StepResult
from workers.engine.sampling_params import SamplingParams

BS = 4


class FakeTokenizer:
    eos_token_ids = [0]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids if not (skip_special_tokens and i == 0))


class FakeRunner:
    """Mirrors worker state like ModelRunner and 'samples' a token that depends only on the
    sequence so far, so any schedule must give the same outputs (like greedy decoding)."""

    def __init__(self):
        self.seqs = {}
        self.plans: list[StepPlan] = []

    def execute(self, plan: StepPlan) -> StepResult:
        self.plans.append(plan)
        for rid in plan.finished_ids:
            self.seqs.pop(rid, None)
        work = []
        for nr in plan.new_requests:
            assert nr.request_id not in self.seqs
            self.seqs[nr.request_id] = [list(nr.token_ids), nr.num_computed_tokens, list(nr.block_ids)]
            work.append((nr.request_id, nr.num_new_tokens))
        for rr in plan.running:
            self.seqs[rr.request_id][2].extend(rr.new_block_ids)
            work.append((rr.request_id, rr.num_new_tokens))
        res = StepResult(step_id=plan.step_id)
        for rid, n in work:
            toks, c, blocks = self.seqs[rid]
            assert len(blocks) * BS >= c + n, "plan gave too few blocks"
            self.seqs[rid][1] = c + n
            if c + n == len(toks):
                tok = 1 + (sum(toks) * 31 + len(toks)) % 97
                toks.append(tok)
                res.request_ids.append(rid)
                res.token_ids.append(tok)
        return res


def make_core(num_blocks=64, max_num_seqs=8, budget=32, max_model_len=256, max_waiting=100):
    alloc = BlockAllocator(num_blocks, BS, enable_prefix_caching=True)
    sched = Scheduler(alloc, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                      max_model_len=max_model_len, max_waiting=max_waiting)
    return EngineCore(sched, FakeRunner(), FakeTokenizer()), alloc


def run_all(core, max_steps=10_000):
    outs = {}
    for _ in range(max_steps):
        if not core.has_unfinished():
            break
        for o in core.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                outs[o.request_id + ":reason"] = o.finish_reason
    assert not core.has_unfinished()
    return outs


def prompts(n, base=10):
    return [[base + i + j for j in range(5 + 7 * i % 23)] for i in range(n)]


def test_generates_max_tokens_and_frees_every_block():
    core, alloc = make_core()
    for i, p in enumerate(prompts(5)):
        core.add_request(f"r{i}", p, SamplingParams(max_tokens=6, ignore_eos=True))
    outs = run_all(core)
    for i in range(5):
        assert len(outs[f"r{i}"]) == 6 and outs[f"r{i}:reason"] == "length"
    assert alloc.num_free_blocks == alloc.num_blocks
    alloc.check_invariants()


def test_token_budget_and_chunked_prefill():
    core, _ = make_core(budget=8)
    core.add_request("long", list(range(1, 30)), SamplingParams(max_tokens=2, ignore_eos=True))
    core.add_request("short", [5, 6, 7], SamplingParams(max_tokens=2, ignore_eos=True))
    run_all(core)
    plans = core.runner.plans
    assert all(p.num_tokens <= 8 for p in plans)
    # The 29-token prompt is split over several steps.
    first = plans[0].new_requests[0]
    assert first.request_id == "long" and first.num_new_tokens == 8


def test_schedule_independence_batched_vs_alone_vs_chunked():
    ps = prompts(6)
    sp = SamplingParams(max_tokens=10, ignore_eos=True)
    alone = {}
    for i, p in enumerate(ps):
        core, _ = make_core()
        core.add_request(f"r{i}", p, sp)
        alone[f"r{i}"] = run_all(core)[f"r{i}"]
    core, _ = make_core(budget=5)   # tiny budget: chunked prefill mixed with decodes
    for i, p in enumerate(ps):
        core.add_request(f"r{i}", p, sp)
    batched = run_all(core)
    assert all(batched[k] == v for k, v in alone.items())


def test_priority_orders_admission():
    core, _ = make_core(max_num_seqs=1)
    core.add_request("low", [1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True), priority=0)
    core.add_request("high", [4, 5, 6], SamplingParams(max_tokens=2, ignore_eos=True), priority=5)
    core.add_request("high2", [4, 5, 7], SamplingParams(max_tokens=2, ignore_eos=True), priority=5)
    run_all(core)
    admitted = [nr.request_id for p in core.runner.plans for nr in p.new_requests]
    assert admitted == ["high", "high2", "low"]


def test_high_priority_preempts_low_when_seats_are_full():
    core, alloc = make_core(max_num_seqs=1)
    core.add_request("low", [1, 2, 3], SamplingParams(max_tokens=20, ignore_eos=True), priority=0)
    early = core.step() + core.step()
    core.add_request("high", [4, 5, 6], SamplingParams(max_tokens=3, ignore_eos=True), priority=9)
    outs = run_all(core)
    outs["low"] = [t for o in early for t in o.new_token_ids] + outs["low"]
    assert core.scheduler.num_preemptions >= 1
    assert len(outs["low"]) == 20 and len(outs["high"]) == 3
    assert alloc.num_free_blocks == alloc.num_blocks


def test_tiny_kv_forces_preemption_and_still_matches():
    ps = prompts(6)
    sp = SamplingParams(max_tokens=24, ignore_eos=True)
    core, _ = make_core(num_blocks=256)
    for i, p in enumerate(ps):
        core.add_request(f"r{i}", p, sp)
    roomy = run_all(core)
    core, alloc = make_core(num_blocks=14)
    for i, p in enumerate(ps):
        core.add_request(f"r{i}", p, sp)
    tight = run_all(core)
    assert core.scheduler.num_preemptions > 0
    assert all(tight[k] == v for k, v in roomy.items())
    assert alloc.num_free_blocks == alloc.num_blocks


def test_prefix_cache_hit_skips_compute_and_matches():
    shared = list(range(100, 120))   # 5 full blocks
    sp = SamplingParams(max_tokens=4, ignore_eos=True)
    core, _ = make_core()
    core.add_request("a", shared + [1, 2], sp)
    a = run_all(core)["a"]
    core.add_request("b", shared + [1, 2], sp)
    core.add_request("c", shared + [7], sp)
    outs = run_all(core)
    assert outs["b"] == a
    news = {nr.request_id: nr for p in core.runner.plans for nr in p.new_requests}
    assert news["b"].num_computed_tokens == 20 and news["c"].num_computed_tokens == 20
    assert core.stats().prefix_cache_hit_rate > 0


def test_fully_cached_prompt_still_computes_its_last_token():
    sp = SamplingParams(max_tokens=2, ignore_eos=True)
    core, _ = make_core()
    core.add_request("a", list(range(1, 9)), sp)      # exactly 2 blocks
    run_all(core)
    core.add_request("b", list(range(1, 9)), sp)
    run_all(core)
    nb = [nr for p in core.runner.plans for nr in p.new_requests if nr.request_id == "b"][0]
    assert nb.num_computed_tokens == 4 and nb.num_new_tokens == 4


def test_abort_frees_blocks_and_worker_forgets():
    core, alloc = make_core()
    core.add_request("x", list(range(1, 20)), SamplingParams(max_tokens=50, ignore_eos=True))
    core.add_request("y", [1, 2], SamplingParams(max_tokens=50, ignore_eos=True))
    core.step()
    core.step()
    assert core.abort("x") and core.abort("y")
    assert not core.abort("nope")
    assert alloc.num_free_blocks == alloc.num_blocks
    core.add_request("z", [3, 4], SamplingParams(max_tokens=1, ignore_eos=True))
    core.step()
    assert set(core.runner.plans[-1].finished_ids) == {"x", "y"}
    assert "x" not in core.runner.seqs


def test_eos_stop_token_and_stop_string():
    core, _ = make_core()
    core.add_request("s", [1, 2, 3], SamplingParams(max_tokens=50, stop_token_ids=[0, *range(1, 98)]))
    outs = run_all(core)
    assert len(outs["s"]) == 1 and outs["s:reason"] == "stop"


def test_bad_input_raises_before_queueing():
    core, _ = make_core(max_model_len=16, max_waiting=1, max_num_seqs=1)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        core.add_request("a", [1], SamplingParams(max_tokens=0))
    with pytest.raises(InvalidRequestError, match="temperature"):
        core.add_request("a", [1], SamplingParams(temperature=-1))
    with pytest.raises(InvalidRequestError, match="top_p"):
        core.add_request("a", [1], SamplingParams(top_p=0))
    with pytest.raises(InvalidRequestError, match="prompt"):
        core.add_request("a", list(range(16)), SamplingParams())
    with pytest.raises(InvalidRequestError, match="prompt"):
        core.add_request("a", [], SamplingParams())
    assert not core.has_unfinished()
    core.add_request("ok", [1], SamplingParams())        # gets the one seat at the next step
    core.add_request("queued", [1], SamplingParams())    # the one queue slot beyond the seats
    with pytest.raises(QueueFullError) as e:
        core.add_request("full", [1], SamplingParams())
    assert e.value.retry_after_ms > 0
    assert core.scheduler.num_waiting == 2


def test_context_limit_finishes_with_length():
    core, alloc = make_core(max_model_len=12)
    core.add_request("a", list(range(1, 9)), SamplingParams(max_tokens=100, ignore_eos=True))
    outs = run_all(core)
    assert len(outs["a"]) == 4 and outs["a:reason"] == "length"
    assert alloc.num_free_blocks == alloc.num_blocks
