"""Speculative decoding on the batcher side with a fake worker (no model): draft slots and their blocks,
rollback of rejected slots, the budget charge, the step pipeline, stops inside accepted tokens, the
max_tokens cap, the adaptive policy (batch size, acceptance, re-probing) and the counters.

The fake worker knows a "true" next token for every sequence (a function of the tokens so far, so
any schedule must give the same output, like greedy decoding) and verifies drafts against it the
way the real one does: the longest matching prefix of the drafts, plus the true token after it.
"""
from __future__ import annotations

import numpy as np
import pytest

from batcher.engine_core import EngineCore
from batcher.prompt_lookup import propose_from_context
from batcher.request import Request
from batcher.scheduler import Scheduler
from batcher.spec_policy import PROBE_INTERVAL, SpecPolicy, best_k
from kv_manager.block_allocator import BlockAllocator
from tests.pipelined import drive
from workers.engine.plan import StepPlan, StepResult
from workers.engine.sampling_params import SamplingParams

BS = 4


class FakeTokenizer:
    eos_token_ids = [0]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids if not (skip_special_tokens and i == 0))


def copy_truth(toks: list[int], num_prompt: int) -> int:
    """Copy-heavy: mostly repeats the sequence 7 tokens back, with a deviation every 5th position."""
    n = len(toks)
    if n % 5 == 0:
        return 1 + (sum(toks[-3:]) * 31 + n) % 97
    return toks[n - 7] if n >= 7 else 1 + (n * 13) % 97


class FakeWorker:
    """Mirrors requests like ModelRunner (tokens, computed count, block table), verifies drafts and
    trims a speculating row's table to ceil(computed / block_size) blocks, as the contract says.
    Drafts of its own (the draft-model methods): the true continuation with every third one wrong."""

    def __init__(self, truth=copy_truth, step_ms=lambda tokens: 10.0 + 0.1 * tokens):
        self.truth = truth
        self.step_ms = step_ms
        self.seqs: dict[str, list] = {}
        self.plans: list[StepPlan] = []

    def _true(self, toks, np_):
        return self.truth(toks, np_)

    def execute(self, plan: StepPlan) -> StepResult:
        self.plans.append(plan)
        for rid in plan.finished_ids:
            self.seqs.pop(rid, None)
        work = []
        for nr in plan.new_requests:
            assert nr.request_id not in self.seqs
            self.seqs[nr.request_id] = [list(nr.token_ids), nr.num_computed_tokens, list(nr.block_ids),
                                        nr.num_prompt_tokens]
            work.append((nr.request_id, nr.num_new_tokens, 0, []))
        for rr in plan.running:
            self.seqs[rr.request_id][2].extend(rr.new_block_ids)
            work.append((rr.request_id, rr.num_new_tokens, rr.num_spec_tokens, rr.draft_token_ids))
        res = StepResult(step_id=plan.step_id, execute_ms=self.step_ms(plan.num_tokens))
        spec = any(k for _, _, k, _ in work)
        for rid, n, k, drafts in work:
            st = self.seqs[rid]
            toks, c, blocks, np_ = st
            assert len(blocks) * BS >= c + n + k, "plan gave too few blocks"
            assert not k or (n == 1 and c == len(toks) - 1), "speculation outside decode state"
            st[1] = c = c + n
            if c != len(toks):
                continue
            if not k:
                emitted = [self._true(toks, np_)]
                drafts = []
            else:
                assert len(drafts) <= k
                if not drafts:
                    drafts = self._own_drafts(toks, np_, k)
                emitted = []
                for d in drafts:
                    t = self._true(toks + emitted, np_)
                    emitted.append(t)
                    if t != d:
                        break
                else:
                    emitted.append(self._true(toks + emitted, np_))
                toks.extend(emitted[:-1])
            toks.append(emitted[-1])
            if k:
                st[1] = len(toks) - 1
                del blocks[-(-st[1] // BS):]
            res.request_ids.append(rid)
            res.token_ids.extend(emitted)
            res.num_emitted.append(len(emitted))
            res.num_drafted.append(len(drafts))
        if not spec:
            assert all(e == 1 for e in res.num_emitted)
            res.num_emitted, res.num_drafted = [], []   # the one-token-each form
        return res

    def _own_drafts(self, toks, np_, k):
        out = []
        for j in range(k):
            t = self._true(toks + out, np_)
            out.append(t + 1 if (len(toks) + j) % 3 == 2 else t)
        return out


def make_core(method="prompt_lookup", *, k=4, adaptive=False, num_blocks=128, budget=64, max_num_seqs=8,
              max_model_len=512, worker=None):
    alloc = BlockAllocator(num_blocks, BS, enable_prefix_caching=True)
    spec = SpecPolicy(method, k, adaptive) if method != "off" else None
    sched = Scheduler(alloc, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                      max_model_len=max_model_len, max_waiting=100, spec=spec)
    return EngineCore(sched, worker or FakeWorker(), FakeTokenizer()), alloc


def run_all(core, depth=1, max_steps=5000, check_tables=True):
    """Drive like the batcher: up to `depth` plans at the worker. Returns per request (tokens, text,
    finish reason, finishing output). With depth 1, checks after every step that worker and
    scheduler agree on every running request's block table."""
    outs: dict[str, list] = {}
    worker = core.runner
    for step in drive(core, worker.execute, depth, max_steps=max_steps):
        for o in step:
            t = outs.setdefault(o.request_id, [[], "", None, None])
            t[0] += o.new_token_ids
            t[1] += o.new_text
            if o.finished:
                t[2], t[3] = o.finish_reason, o
        if check_tables and depth == 1:
            for r in core.scheduler.running:
                if r.sent_to_worker:
                    assert worker.seqs[r.request_id][2] == r.block_ids
                    assert worker.seqs[r.request_id][1] == r.num_computed_tokens
    assert not core.has_unfinished()
    return outs


def prompts(n):
    return [[10 + (i * 7 + j * 3) % 40 for j in range(6 + 5 * i)] for i in range(n)]


def add_all(core, ps, sps):
    for i, (p, sp) in enumerate(zip(ps, sps)):
        core.add_request(f"r{i}", p, sp)


def tokens_only(outs):
    return {r: (v[0], v[2]) for r, v in outs.items()}


def assert_all_blocks_back(alloc):
    alloc.check_invariants()
    assert alloc.num_free_blocks == alloc.num_blocks and alloc.num_used_blocks == 0


# ---- exactness: speculation never changes the tokens -------------------------------------------

@pytest.mark.parametrize("method", ["prompt_lookup", "suffix", "ngram", "self_draft"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["always", "adaptive"])
@pytest.mark.parametrize("setup", [dict(), dict(budget=7), dict(num_blocks=24), dict(depth=2)],
                         ids=["roomy", "chunked", "preempting", "pipelined"])
def test_speculation_equals_plain_decoding(method, adaptive, setup):
    setup = dict(setup)
    depth = setup.pop("depth", 1)
    ps = prompts(5)
    sps = [SamplingParams(max_tokens=30, ignore_eos=True),
           SamplingParams(max_tokens=25, stop_token_ids=[13]),
           SamplingParams(max_tokens=17, ignore_eos=True, stop=["<22><"]),
           SamplingParams(max_tokens=1, ignore_eos=True),
           SamplingParams(max_tokens=40, ignore_eos=True)]
    ref_core, _ = make_core("off")
    add_all(ref_core, ps, sps)
    ref = run_all(ref_core)
    core, alloc = make_core(method, adaptive=adaptive, **setup)
    if method in ("suffix", "ngram"):   # give the suffix cache some history of this deployment
        add_all(core, ps, sps)
        run_all(core, depth=depth)
    add_all(core, ps, sps)
    outs = run_all(core, depth=depth)
    assert tokens_only(outs) == tokens_only(ref)
    assert {r: v[1] for r, v in outs.items()} == {r: v[1] for r, v in ref.items()}
    assert_all_blocks_back(alloc)
    totals = core.spec_totals()[method]
    assert totals.verify_rows > 0 and totals.accepted <= totals.proposed
    if depth == 1:      # (pipelined, a plain decode is re-checked only now and then)
        assert totals.accepted > 0
    if setup.get("num_blocks"):
        assert core.scheduler.num_preemptions > 0


# ---- one speculating row, step by step --------------------------------------------------------

def test_row_gets_slots_blocks_and_charge_then_rolls_back():
    core, alloc = make_core("self_draft", k=4)
    sched = core.scheduler
    core.add_request("a", list(range(20, 29)), SamplingParams(max_tokens=50, ignore_eos=True))  # 9 tokens
    core.step()                                     # prefill: 10 known tokens, 9 computed
    req = sched.requests["a"]
    assert (req.num_tokens, req.num_computed_tokens, len(req.block_ids)) == (10, 9, 3)
    counter = sched._tenants["default"].counter
    free = alloc.num_free_blocks
    plan = core.schedule()
    (row,) = plan.running
    assert (row.num_new_tokens, row.num_spec_tokens, row.draft_token_ids) == (1, 4, [])
    assert plan.num_tokens == 5
    assert len(req.block_ids) == 4 and row.new_block_ids == req.block_ids[3:]   # positions up to 9 + 4
    assert alloc.num_free_blocks == free - 1
    assert sched._tenants["default"].counter == counter + 5                     # charged 1 + k
    assert req.num_computed_tokens == 10 and req.num_pending == 1 and req.spec_inflight
    assert core.schedule().is_empty                                             # not planned again meanwhile
    out = core.process(core.runner.execute(plan))
    (o,) = out
    # the fake drafter errs at every third position: position 10 % 3 == 1, 11 % 3 == 2 -> 1 accepted + 1
    assert len(o.new_token_ids) == 2 and req.num_tokens == 12
    assert req.num_computed_tokens == 11 and not req.spec_inflight and req.num_pending == 0
    assert len(req.block_ids) == 3 and alloc.num_free_blocks == free             # the 4th went back
    assert (req.spec_proposed, req.spec_accepted) == (4, 1)
    assert core.runner.seqs["a"][2] == req.block_ids


def test_model_free_drafts_travel_in_the_plan_and_k_is_their_count():
    truth = lambda toks, np_: toks[len(toks) - 5]   # noqa: E731
    core, _ = make_core("prompt_lookup", k=8, worker=FakeWorker(truth))
    core.add_request("a", [5, 6, 7, 8, 9, 5, 6], SamplingParams(max_tokens=50, ignore_eos=True))
    core.step()
    req = core.scheduler.requests["a"]
    assert req.all_token_ids == [5, 6, 7, 8, 9, 5, 6, 7]
    plan = core.schedule()
    (row,) = plan.running
    # "5 6 7" occurred at the start: the drafts are what followed it, up to k
    assert row.draft_token_ids == [8, 9, 5, 6, 7] and row.num_spec_tokens == 5
    (o,) = core.process(core.runner.execute(plan))
    assert o.new_token_ids == [8, 9, 5, 6, 7, 8]        # all accepted, plus one
    for _ in range(3):                                    # later lookups see every new token
        plan = core.schedule()
        (row,) = plan.running
        assert row.draft_token_ids == propose_from_context(np.asarray(req.all_token_ids), 8).tolist()
        core.process(core.runner.execute(plan))


def test_no_draft_found_is_a_plain_decode():
    core, _ = make_core("prompt_lookup", k=4)
    core.add_request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=5, ignore_eos=True))
    core.step()
    plan = core.schedule()
    (row,) = plan.running
    assert (row.num_spec_tokens, row.draft_token_ids) == (0, [])
    assert not core.scheduler.requests["a"].spec_inflight


def test_penalties_never_speculate():
    core, _ = make_core("self_draft")
    core.add_request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=6, ignore_eos=True, repetition_penalty=1.2))
    core.add_request("b", [1, 2, 3, 4, 6], SamplingParams(max_tokens=6, ignore_eos=True, presence_penalty=0.5))
    run_all(core)
    assert all(r.num_spec_tokens == 0 for p in core.runner.plans for r in p.running)


# ---- stops inside a step's tokens, caps ------------------------------------------------------

def copying_without_and_with_speculation(sp: SamplingParams):
    """One request whose output copies its prompt (truth: 7 tokens back, so every prompt-lookup draft
    is accepted), run without speculation and with k=6: (its result off, its result on, allocator)."""
    prompt = [11, 12, 13, 14, 15, 16, 17]
    truth = lambda toks, np_: toks[len(toks) - 7]   # noqa: E731
    ref, _ = make_core("off", worker=FakeWorker(truth))
    ref.add_request("a", prompt, sp)
    core, alloc = make_core("prompt_lookup", k=6, worker=FakeWorker(truth))
    core.add_request("a", prompt, sp)
    return run_all(ref)["a"], run_all(core)["a"], alloc


def test_stop_token_in_the_middle_of_accepted_tokens_discards_the_rest():
    want, got, alloc = copying_without_and_with_speculation(SamplingParams(max_tokens=30, stop_token_ids=[14]))
    assert got[0] == want[0] == [11, 12, 13, 14] and got[2] == "stop"
    # the verification row emitted more than it kept: its stop was inside
    sched_out = got[3]
    assert sched_out.num_output_tokens == 4 and sched_out.spec_accepted >= 3
    assert_all_blocks_back(alloc)


def test_stop_string_inside_accepted_tokens():
    want, got, _ = copying_without_and_with_speculation(SamplingParams(max_tokens=30, stop=["<13><14>"]))
    assert got[:3] == want[:3] and got[2] == "stop" and got[1] == "<11><12>"


@pytest.mark.parametrize("max_tokens", [2, 3, 6, 9])
def test_k_never_overshoots_max_tokens_or_the_context(max_tokens):
    truth = lambda toks, np_: toks[len(toks) - 7]   # noqa: E731   every draft right
    core, _ = make_core("self_draft", k=8, worker=FakeWorker(truth))
    core.add_request("a", [11, 12, 13, 14, 15, 16, 17], SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    out = run_all(core)["a"]
    assert len(out[0]) == max_tokens and out[2] == "length"
    for p in core.runner.plans[1:]:
        for r in p.running:
            assert r.num_spec_tokens <= max_tokens - 2
    # the context: 7 prompt tokens in a 16-token window leave 9 to generate
    core, _ = make_core("self_draft", k=8, max_model_len=16, worker=FakeWorker(truth))
    core.add_request("b", [11, 12, 13, 14, 15, 16, 17], SamplingParams(max_tokens=100, ignore_eos=True))
    out = run_all(core)["b"]
    assert len(out[0]) == 9 and out[2] == "length"
    for p in core.runner.plans:
        for r in p.running:
            assert r.num_spec_tokens <= 8


def test_draft_slots_fit_the_budget_and_never_preempt():
    core, alloc = make_core("self_draft", k=8, budget=4)
    core.add_request("a", [11, 12, 13], SamplingParams(max_tokens=20, ignore_eos=True))
    run_all(core)
    assert all(p.num_tokens <= 4 for p in core.runner.plans)
    assert any(r.num_spec_tokens == 3 for p in core.runner.plans for r in p.running)
    # a pool with no block to spare: the draft slots are dropped, nobody is preempted for them
    core, alloc = make_core("self_draft", k=8, num_blocks=6)
    core.add_request("a", list(range(11, 30)), SamplingParams(max_tokens=3, ignore_eos=True))   # 19 tokens
    core.add_request("b", [11, 12], SamplingParams(max_tokens=3, ignore_eos=True))
    run_all(core)
    assert core.scheduler.num_preemptions == 0
    assert_all_blocks_back(alloc)


def test_draft_slots_leave_every_other_decode_its_token():
    core, _ = make_core("self_draft", k=8, budget=8)
    for i in range(4):
        core.add_request(f"r{i}", [11 + i, 12], SamplingParams(max_tokens=60, ignore_eos=True))
    core.step()                                       # the four prefills
    for _ in range(5):
        plan = core.schedule()
        assert len(plan.running) == 4 and plan.num_tokens <= 8
        assert sum(r.num_spec_tokens for r in plan.running) == 4   # what the budget leaves
        core.process(core.runner.execute(plan))


# ---- the step pipeline ---------------------------------------------------------------------

def test_pipelined_planning_skips_a_speculating_request_until_its_result_lands():
    core, alloc = make_core("self_draft", k=3)
    core.add_request("a", [11, 12, 13, 14, 15], SamplingParams(max_tokens=40, ignore_eos=True))
    core.add_request("b", [21, 22, 23], SamplingParams(max_tokens=40, ignore_eos=True, repetition_penalty=1.1))
    worker = core.runner
    seen_a_in_flight = 0

    def check(plan, queued):
        nonlocal seen_a_in_flight
        ids = [r.request_id for r in plan.running] + [r.request_id for r in plan.new_requests]
        in_flight = {r.request_id for p in queued for r in p.running if r.num_spec_tokens}
        assert not (in_flight & set(ids)), "a speculating request planned again before its result"
        seen_a_in_flight += bool(in_flight)
    for _ in drive(core, worker.execute, 2, on_plan=check):
        pass
    assert seen_a_in_flight > 0                # "b" (penalties: never speculates) kept the pipeline going
    assert any(r.request_id == "a" and r.num_spec_tokens for p in worker.plans for r in p.running)
    assert_all_blocks_back(alloc)


# ---- the policy ----------------------------------------------------------------------------

def test_best_k_is_the_marginal_break_even():
    assert best_k(0.8, 0.0, 4) == 4                 # free drafts: all of them
    assert best_k(0.5, 0.3, 8) == 1                 # 0.5^2 = 0.25 < 0.3
    assert best_k(0.9, 0.5, 8) == 6                 # 0.9^6 = 0.53 > 0.5 > 0.9^7
    assert best_k(0.3, 0.3, 8) == 0                 # acceptance at break-even: off
    # pipelined (speculating costs the request a step): 0.6 + .36 + .22 + .13 - 0.4 = 0.91 < 1 token
    assert best_k(0.6, 0.1, 4, penalty=1.0) == 0
    assert best_k(0.8, 0.1, 4, penalty=1.0) == 4    # 0.8 + .64 + .51 + .41 - 0.4 = 1.96


def test_step_cost_fit_recovers_base_and_per_token():
    pol = SpecPolicy("self_draft", 4)
    for i in range(200):
        tokens = 1 + (i * 7) % 40
        pol.observe_step(tokens, 12.0 + 0.5 * tokens)
    assert pol.cost.base_ms == pytest.approx(12.0, rel=1e-3)
    assert pol.cost.per_token_ms == pytest.approx(0.5, rel=1e-3)
    pol.begin_step(1, pipelined=False)
    assert pol.lam == pytest.approx(0.5 / 12.5)
    pol.begin_step(64, pipelined=False)
    assert pol.lam == pytest.approx(32 / 44)


def _req(rid="a", toks=(1, 2, 3, 4, 5, 6)):
    r = Request(rid, list(toks), SamplingParams(max_tokens=100), seed=0)
    return r


def test_policy_turns_off_for_low_acceptance_reprobes_and_comes_back():
    pol = SpecPolicy("self_draft", 4)
    for i in range(100):
        pol.observe_step(1 + i % 9, 20.0 + 1.0 * (1 + i % 9))
    pol.begin_step(1, pipelined=False)                   # a draft costs 1/21 of a token
    req = _req()
    k, drafts = pol.plan(req, 10)
    assert k == 4 and drafts == []                       # prior acceptance 0.6
    for _ in range(12):
        pol.observe(req, 4, 1)                           # every draft rejected
    assert req.spec.alpha < 0.04
    decisions = [pol.plan(req, 10)[0] for _ in range(3 * PROBE_INTERVAL)]
    probes = [i for i, k in enumerate(decisions) if k]
    assert probes == [PROBE_INTERVAL - 1, 2 * PROBE_INTERVAL - 1, 3 * PROBE_INTERVAL - 1]
    assert all(decisions[i] == 1 for i in probes)        # a probe verifies one draft
    for _ in range(6):                                    # the probes now come back accepted
        pol.observe(req, 1, 2)
    assert pol.plan(req, 10)[0] >= 2
    # a fresh request is seeded from the method's (deployment) rate, which the failures pulled down
    assert pol.alpha < 0.6


def test_policy_turns_off_in_a_compute_bound_batch_and_back_on_when_it_shrinks():
    pol = SpecPolicy("self_draft", 4)
    for i in range(100):                                 # 5 ms + 1 ms per token
        pol.observe_step(1 + i % 50, 5.0 + 1.0 * (1 + i % 50))
    req = _req()
    for _ in range(10):
        pol.observe(req, 4, 4)                           # good acceptance: ~0.75
    assert 0.6 < req.spec.alpha < 0.95
    pol.begin_step(48, pipelined=False)                  # lambda = 48 / 53
    assert pol.plan(req, 10) == (0, [])
    for _ in range(3 * PROBE_INTERVAL):                  # and no probes while compute-bound
        assert pol.plan(req, 10) == (0, [])
    pol.begin_step(2, pipelined=False)                   # lambda = 2 / 7
    assert pol.plan(req, 10)[0] >= 2


def test_adaptive_off_always_drafts_k():
    pol = SpecPolicy("self_draft", 3, adaptive=False)
    for i in range(50):
        pol.observe_step(1 + i % 50, 5.0 + 1.0 * (1 + i % 50))
    pol.begin_step(64, pipelined=True)
    req = _req()
    for _ in range(10):
        pol.observe(req, 3, 1)
    assert pol.plan(req, 10) == (3, [])
    assert pol.plan(req, 2) == (2, [])


def test_large_batch_engine_stops_speculating_and_small_batch_keeps_it():
    """End to end through the scheduler: step time = 5 ms + 1 ms per token (compute-bound at 32 rows)."""
    def ms(tokens):
        return 5.0 + 1.0 * tokens

    truth = lambda toks, np_: toks[len(toks) - 7]   # noqa: E731  copy-heavy: drafts right
    core, _ = make_core("prompt_lookup", k=4, adaptive=True, max_num_seqs=32, budget=512, num_blocks=1024,
                        worker=FakeWorker(truth, ms))
    for i in range(32):
        core.add_request(f"r{i}", [11 + i, 12, 13, 14, 15, 16, 17], SamplingParams(max_tokens=40, ignore_eos=True))
    run_all(core)
    plans = core.runner.plans
    late = [p for p in plans[5:] if len(p.running) >= 24]
    assert late and all(r.num_spec_tokens == 0 for p in late for r in p.running)
    core, _ = make_core("prompt_lookup", k=4, adaptive=True, worker=FakeWorker(truth, ms))
    core.add_request("solo", [11, 12, 13, 14, 15, 16, 17], SamplingParams(max_tokens=40, ignore_eos=True))
    out = run_all(core)["solo"]
    assert out[3].decode_steps < 15 and out[3].spec_accepted > 25


# ---- counters --------------------------------------------------------------------------------

def test_counters_per_request_and_per_method():
    core, _ = make_core("ngram", k=4)
    ps = prompts(3)
    sps = [SamplingParams(max_tokens=20, ignore_eos=True)] * 3
    add_all(core, ps, sps)
    outs = run_all(core)
    fin = [v[3] for v in outs.values()]
    totals = core.spec_totals()["ngram"]
    assert sum(o.spec_proposed for o in fin) == totals.proposed > 0
    assert sum(o.spec_accepted for o in fin) == totals.accepted > 0
    for o in fin:
        # every output token but the first came from a decode step; a step gives 1 + its accepted drafts
        assert o.decode_steps + o.spec_accepted == o.num_output_tokens - 1
    rows = sum(1 for p in core.runner.plans for r in p.running if r.num_spec_tokens)
    assert totals.verify_rows == rows
    assert totals.emitted == totals.accepted + rows
    s = core.stats()
    assert (s.spec_proposed_total, s.spec_accepted_total) == (totals.proposed, totals.accepted)
    off, _ = make_core("off")
    assert off.spec_totals() == {}


def test_suffix_cache_learns_from_finished_requests():
    core, _ = make_core("suffix", k=4)
    core.add_request("a", [40, 41, 42], SamplingParams(max_tokens=20, ignore_eos=True))
    first = run_all(core)["a"][3]
    assert first.spec_proposed == 0                  # nothing seen yet in this deployment
    assert len(core.scheduler.spec.suffix) == 0       # learned at the next step, off the finishing one
    core.add_request("b", [40, 41, 42], SamplingParams(max_tokens=20, ignore_eos=True))
    again = run_all(core)["b"][3]
    assert again.spec_accepted > 10 and again.decode_steps < 10
    assert len(core.scheduler.spec.suffix) == 1


def test_pipelined_rechecks_back_off_while_nothing_is_found():
    """Under the step pipeline a plain decode is skipped once now and then to be seen in decode state
    (the only place drafts can be looked up); each check that finds nothing doubles the wait."""
    pol = SpecPolicy("prompt_lookup", 4)
    req = _req(toks=(1, 2, 3, 4, 5, 6))                  # no n-gram repeats: nothing to copy
    checks = []
    for step in range(400):
        pol.begin_step(4, pipelined=True)
        if pol.wants_pending(req):
            checks.append(step)
            assert pol.plan(req, 10) == (0, [])          # the re-check finds nothing
    gaps = [b - a for a, b in zip(checks, checks[1:])]
    assert gaps[:4] == [17, 33, 65, 129] and checks[0] == 0
    # a speculating request is always held back until it is in decode state
    req2 = _req("b", toks=(5, 6, 7, 5, 6, 7, 5, 6))
    assert pol.plan(req2, 10)[0] > 0 and pol.wants_pending(req2)
    # compute-bound: no re-checks at all
    for i in range(60):
        pol.observe_step(1 + i % 50, 1.0 + 1.0 * (1 + i % 50))
    pol.begin_step(64, pipelined=True)
    req3 = _req("c")
    assert not any(pol.wants_pending(req3) for _ in range(300))
