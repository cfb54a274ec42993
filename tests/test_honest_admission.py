"""Honest admission (batcher/scheduler.py + batcher/step_timing.py WaitPredictor): the queue bound
counts only requests that will not get a seat, a request whose predicted wait for a first token
exceeds its deadline or max_queue_delay is refused at once, and retry-after is the time the queue
ahead takes, from the measured rates. Time is a fake clock and step times are scripted, so every
figure is exact."""
from __future__ import annotations

import pytest

from batcher.engine_core import EngineCore
from batcher.request import Request, RequestStatus
from batcher.scheduler import Scheduler
from batcher.step_timing import RETRY_MAX_S, RETRY_MIN_S, WaitPredictor
from kv_manager.block_allocator import BlockAllocator
from workers.engine.errors import QueueFullError
from workers.engine.plan import StepPlan, StepResult
from workers.engine.sampling_params import SamplingParams

BS = 16


class Clock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def measured(clock: Clock, prefill_tok_s: float = 2000.0, decode_step_s: float = 0.02) -> WaitPredictor:
    """A predictor that has seen a few decode steps and one mixed step at the given rates."""
    p = WaitPredictor(clock)
    for _ in range(3):
        p.observe_step(0, 8, decode_step_s)
    p.observe_step(1000, 8, decode_step_s + 1000 / prefill_tok_s)
    return p


def request(rid: str, n: int = 500, **kw) -> Request:
    return Request(rid, [1 + (hash(rid) + j) % 900 for j in range(n)], SamplingParams(max_tokens=8), seed=0, **kw)


def scheduler(predictor=None, *, seats=64, max_waiting=1024, delay_s=0.0, wall=None, budget=512) -> Scheduler:
    alloc = BlockAllocator(4096, BS, enable_prefix_caching=False)
    kw = {} if wall is None else {"wall_clock": wall}
    return Scheduler(alloc, max_num_seqs=seats, max_num_batched_tokens=budget, max_model_len=4096,
                     max_waiting=max_waiting, max_queue_delay_s=delay_s, predictor=predictor, **kw)


# ---- the predictor ---------------------------------------------------------------------------------
def test_predictor_learns_rates_from_step_times():
    clock = Clock()
    p = WaitPredictor(clock)
    assert p.queue_wait_s(tokens_ahead=5000, requests_ahead=10, free_seats=0, budget=512) is None   # not measured
    p.observe_step(0, 8, 0.02)
    p.observe_step(8, 0, 0.5)            # too few prefill tokens to say anything about the rate
    assert p.prefill_tok_s is None and p.decode_step_s == 0.02
    p.observe_step(1000, 8, 0.52)        # 0.02 of it is the decode rows: 1000 tokens in 0.5 s
    assert p.prefill_tok_s == pytest.approx(2000)
    # 4000 tokens ahead: 2 s of prefill + 8 steps' decode share, then the step in flight
    wait = p.queue_wait_s(tokens_ahead=4000, requests_ahead=10, free_seats=64, budget=512)
    assert wait == pytest.approx(2.0 + 8 * 0.02 + 0.02)
    assert p.prefill_s(500, 512) == pytest.approx(0.25 + 0.02)


def test_predictor_waits_for_seats_at_the_measured_finish_rate_and_notices_a_stall():
    clock = Clock()
    p = measured(clock)
    for _ in range(10):                  # a seat frees every 0.5 s
        p.note_finished()
        clock.t += 0.5
    clock.t -= 0.5
    wait = p.queue_wait_s(tokens_ahead=400, requests_ahead=4, free_seats=0, budget=512)
    # 2 seats/s (9 after the first in 4.5 s); 5 needed: 4 ahead + its own; and the 400 prompt tokens
    # ahead (0.2 s at 2000/s): the steps that seat them also prefill them, one step at a time
    assert wait == pytest.approx(0.2 + 5 / 2 + 0.02)
    clock.t += 10                        # nothing finished for 10 s: the rate measured up to now falls
    assert p.queue_wait_s(tokens_ahead=400, requests_ahead=4, free_seats=0, budget=512) > 3 * wait


def test_idle_time_is_not_a_stall():
    # Traffic, then minutes with nothing running or waiting, then a burst: the seat rate measured
    # before the idle period must not predict minutes of wait (found by the 50-stream e2e test).
    clock = Clock()
    sched = scheduler(measured(clock), seats=4, delay_s=5.0)
    for i in range(4):
        sched.add(request(f"early{i}", 64))
    sched.schedule()
    for r in list(sched.running):
        clock.t += 0.5
        sched.finish(r, RequestStatus.FINISHED_STOPPED)
    clock.t += 600                       # ten idle minutes
    for i in range(12):                  # 4 take the seats, 8 queue behind them
        sched.add(request(f"burst{i}", 64))
    assert sched.num_waiting == 12


def test_retry_after_is_the_predicted_queue_wait_or_else_the_drain_rate():
    clock = Clock()
    p = WaitPredictor(clock)             # no prefill measured: no model of the queue yet
    assert p.retry_after_s(50, fallback_s=3.0) == 3.0       # no drain measured yet: the fallback
    for _ in range(21):                  # 10 requests leave the queue per second
        p.note_admitted()
        clock.t += 0.1
    clock.t -= 0.1
    assert p.drain_rate() == pytest.approx(10)
    assert p.retry_after_s(50, fallback_s=3.0) == pytest.approx(5.0)
    assert p.retry_after_s(0, fallback_s=0) == RETRY_MIN_S
    assert p.retry_after_s(10**9, fallback_s=0) == RETRY_MAX_S
    p.observe_step(1000, 0, 0.5)         # now the rates are measured: the caller's predicted queue wait
    assert p.retry_after_s(50, fallback_s=3.0) == 3.0


# ---- admission -------------------------------------------------------------------------------------
def test_a_burst_fills_every_free_seat_and_then_the_queue():
    """Issue 16: 300 at once against an idle batcher with 64 seats and max_waiting 16 admitted only
    32 (the bound counted requests that were about to get a seat). Now: 64 + 16."""
    s = scheduler(seats=64, max_waiting=16)
    accepted = 0
    for i in range(300):
        try:
            s.add(request(f"r{i}", 20))
            accepted += 1
        except QueueFullError as e:
            assert "16 requests beyond the 64 seats" in str(e) and e.retry_after_ms > 0
    assert accepted == 80
    s.schedule()                         # some get their seats; the bound stays 16 beyond them
    with pytest.raises(QueueFullError):
        s.add(request("more", 20))


def test_refuses_when_the_predicted_wait_exceeds_max_queue_delay():
    clock = Clock()
    p = measured(clock)                  # 2000 prompt tokens/s, 20 ms steps
    s = scheduler(p, delay_s=1.0)
    accepted = []
    with pytest.raises(QueueFullError) as e:
        for i in range(20):
            s.add(request(f"r{i}", 500))
            accepted.append(i)
    # each 500-token prompt ahead adds ~0.27 s: the fourth would see its first token after > 1 s
    assert len(accepted) == 3
    assert "exceeds max_queue_delay_ms (1000 ms)" in e.value.message and "3 request(s) queued ahead" in e.value.message
    assert e.value.retry_after_ms > 0
    assert s.num_waiting == 3            # nothing of the refused one is kept


def test_retry_after_is_the_time_the_queue_ahead_takes():
    clock = Clock()
    p = measured(clock)
    for _ in range(9):                   # the queue drained at 4 requests/s lately: 3 ahead = 0.75 s
        p.note_admitted()
        clock.t += 0.25
    clock.t -= 0.25
    s = scheduler(p, delay_s=1.0)
    for i in range(3):
        s.add(request(f"r{i}", 500))
    with pytest.raises(QueueFullError) as e:
        s.add(request("late", 500))
    # the 1500 prompt tokens ahead at 2000/s, spread over 3 steps of 20 ms, and the step in flight
    assert e.value.retry_after_ms == 750 + 3 * 20 + 20


def test_seats_filled_at_once_are_not_a_drain_rate():
    """A burst against an idle batcher seats 64 requests in one instant; the queue behind them drains
    only as seats free. Until a later admission is seen, retry-after is the predicted wait."""
    clock = Clock()
    p = measured(clock)
    p.note_admitted(64)
    clock.t += 0.005
    assert p.drain_rate() is None
    assert p.retry_after_s(16, fallback_s=4.0) == 4.0
    clock.t += 0.995
    p.note_admitted(2)                   # two more a second later: 2/s, not 66/s
    assert p.drain_rate() == pytest.approx(2)


def test_refuses_when_the_predicted_wait_exceeds_the_deadline():
    clock, wall = Clock(), Clock(1_700_000_000.0)
    s = scheduler(measured(clock), delay_s=0.0, wall=wall)   # no stack-wide bound: deadlines only
    for i in range(3):
        s.add(request(f"r{i}", 500))     # ~0.8 s of prefill queued
    with pytest.raises(QueueFullError, match="exceeds its deadline"):
        s.add(request("hurry", 500, deadline_unix_ms=int(wall.t * 1000) + 500))
    s.add(request("patient", 500, deadline_unix_ms=int(wall.t * 1000) + 30_000))
    assert "patient" in s.requests and "hurry" not in s.requests


def test_admits_whenever_nothing_is_ahead_however_slow_the_worker():
    clock = Clock()
    s = scheduler(measured(clock, prefill_tok_s=10.0), delay_s=0.5)   # a 500-token prompt takes 50 s
    s.add(request("alone", 500))         # a free seat and no queue: its wait is its own prefill
    assert s.num_waiting == 1


def test_without_measurements_only_the_queue_bound_applies():
    s = scheduler(WaitPredictor(Clock()), seats=2, max_waiting=3, delay_s=0.001)
    for i in range(5):
        s.add(request(f"r{i}", 500))
    with pytest.raises(QueueFullError, match="waiting queue is full"):
        s.add(request("r5", 500))


def test_batch_is_not_refused_by_prediction_and_does_not_fill_the_interactive_queue():
    clock = Clock()
    s = scheduler(measured(clock), seats=1, max_waiting=2, delay_s=0.1)
    for i in range(3):                   # one seat + two queue slots of batch work
        s.add(request(f"b{i}", 500, service_class="batch"))
    with pytest.raises(QueueFullError, match="waiting queue is full"):
        s.add(request("b3", 500, service_class="batch"))
    s.add(request("i0", 500))            # interactive: batch gives up its seat, nothing is ahead
    assert s.num_waiting == 4


# ---- the goal: retry-after within 2x of the time the queue actually takes ---------------------------
class TimedWorker:
    """A fake worker whose step takes 10 ms + 0.5 ms per prefill token and 1 ms per decode row, on
    the fake clock; it samples token 7 when a chunk reaches the end of what it knows, and records when
    each request was first scheduled and got its first token."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.seqs: dict[str, list[int]] = {}
        self.admitted_at: dict[str, float] = {}
        self.first_token: dict[str, float] = {}

    def step_s(self, work: list[tuple[str, int]]) -> float:
        """Seconds a step of these (request id, tokens) chunks takes."""
        return 0.010 + sum(0.0005 * n if n > 1 else 0.001 for _, n in work)

    def execute(self, plan: StepPlan) -> StepResult:
        for rid in plan.finished_ids:
            self.seqs.pop(rid, None)
        for nr in plan.new_requests:
            self.seqs[nr.request_id] = [len(nr.token_ids), nr.num_computed_tokens]
            self.admitted_at.setdefault(nr.request_id, self.clock.t)
        work = [(nr.request_id, nr.num_new_tokens) for nr in plan.new_requests]
        work += [(rr.request_id, rr.num_new_tokens) for rr in plan.running]
        took = self.step_s(work)
        self.clock.t += took
        res = StepResult(step_id=plan.step_id, execute_ms=1000 * took)
        for rid, n in work:
            s = self.seqs[rid]
            s[1] += n
            if s[1] == s[0]:
                s[0] += 1
                res.request_ids.append(rid)
                res.token_ids.append(7)
                self.first_token.setdefault(rid, self.clock.t)
        return res


def test_under_a_10x_burst_refusals_are_honest():
    """Steady load, then ten times as many arrivals per step. Every admitted request starts within
    the bound (plus one step of prediction error), every refusal is immediate, and each refusal's
    retry-after is within 2x of the time the queue ahead of it actually took to drain."""
    clock = Clock()
    worker = TimedWorker(clock)
    alloc = BlockAllocator(8192, BS, enable_prefix_caching=False)
    sched = Scheduler(alloc, max_num_seqs=16, max_num_batched_tokens=256, max_model_len=1024,
                      max_waiting=10_000, max_queue_delay_s=2.0, predictor=WaitPredictor(clock))
    core = EngineCore(sched, worker, type("Tok", (), {"eos_token_ids": [0], "decode": lambda *a, **k: ""})())
    arrived: dict[str, float] = {}
    refusals: list[tuple[float, float, set[str]]] = []   # (when, retry-after s, ids queued ahead)
    n = 0
    for step in range(400):
        per_step = 1 if step < 100 or step >= 160 else 10
        for _ in range(per_step if step % 2 == 0 else 0):
            n += 1
            rid = f"r{n}"
            ahead = {r.request_id for r in sched.requests.values() if r.status.value == "waiting"}
            try:
                core.add_request(rid, [1 + (n * 31 + j) % 900 for j in range(120)],
                                 SamplingParams(max_tokens=24, ignore_eos=True))
                arrived[rid] = clock.t
            except QueueFullError as e:
                refusals.append((clock.t, e.retry_after_ms / 1000, ahead))
        core.step()
    while core.has_unfinished():
        core.step()
    assert refusals, "the burst was meant to overload the worker"
    waits = [worker.admitted_at[rid] - t for rid, t in arrived.items()]
    assert max(waits) < 2.0 + 0.5, max(waits)
    ratios = []
    for when, retry_s, ahead in refusals:
        drained = max(worker.admitted_at[rid] for rid in ahead) - when
        ratios.append(retry_s / drained)
    assert 0.5 <= min(ratios) and max(ratios) <= 2.0, (min(ratios), max(ratios))


# ---- issue 16: a cohort arriving at once on a CPU-like worker --------------------------------------
class CpuLikeWorker(TimedWorker):
    """A step costs 5 ms + 6 ms per prefill token + 8 ms per decode row, as on a 2-core CPU where a
    batch of 64 decode rows takes ~0.5 s and 4 rows ~40 ms."""

    def step_s(self, work: list[tuple[str, int]]) -> float:
        prefill = sum(n for _, n in work if n > 1)
        rows = sum(1 for _, n in work if n == 1)
        return 0.005 + 0.006 * prefill + 0.008 * rows


def cohort_stack(delay_s: float):
    clock = Clock()
    worker = CpuLikeWorker(clock)
    alloc = BlockAllocator(8192, BS, enable_prefix_caching=False)
    sched = Scheduler(alloc, max_num_seqs=64, max_num_batched_tokens=512, max_model_len=1024,
                      max_waiting=10_000, max_queue_delay_s=delay_s, predictor=WaitPredictor(clock))
    core = EngineCore(sched, worker, type("Tok", (), {"eos_token_ids": [0], "decode": lambda *a, **k: ""})())
    for lap in range(3):                 # steady load first: 4 streams of 32 tokens, as bench chaos runs
        for i in range(4):
            core.add_request(f"steady{lap}.{i}", [1 + (lap * 7 + i * 13 + j) % 900 for j in range(10)],
                             SamplingParams(max_tokens=32, ignore_eos=True))
        while core.has_unfinished():
            core.step()
    return clock, worker, sched, core


def burst_prompt(i: int) -> list[int]:
    return [1 + (i * 31 + j) % 900 for j in range(8 + i % 5)]


def test_a_cohort_arriving_at_once_is_predicted_within_2x_of_its_first_tokens():
    """Issue 16: 300 requests at once against 64 seats of one CPU worker. The 65th waits for the
    first cohort's whole generation, the 129th for two; the predictor used to see only the prompt
    work ahead and a 4-row decode step (22 of 300 then waited 30 s for DEADLINE_EXCEEDED). Every
    arrival's predicted first-token wait must be within 2x of the simulated one, but for those whose
    prefill shares the first step with arrivals behind them: that step grows to the whole token
    budget after they were predicted, so theirs is late by at most one full step."""
    clock, worker, sched, core = cohort_stack(delay_s=0.0)   # nothing refused: every prediction is checked
    p = sched.predictor
    assert p.hold_steps == pytest.approx(33, abs=1)       # learnt from the steady load
    t0 = clock.t
    predicted: dict[str, tuple[float, int]] = {}
    for i in range(300):
        prompt = burst_prompt(i)
        queued = sum(r.num_tokens for r in sched.requests.values() if r.status == RequestStatus.WAITING)
        wait = p.queue_wait_s(tokens_ahead=queued, requests_ahead=sched.num_waiting,
                              free_seats=64 - len(sched.running), budget=512)
        predicted[f"b{i}"] = (wait + p.prefill_s(len(prompt), 512), queued + len(prompt))
        core.add_request(f"b{i}", prompt, SamplingParams(max_tokens=32, ignore_eos=True))
    while core.has_unfinished():
        core.step()
    actual = {rid: worker.first_token[rid] - t0 for rid in predicted}
    assert max(actual.values()) > 60     # four cohorts behind the first: the point of the test
    full_step = 512 / p.prefill_tok_s + p.decode_s(64)
    ratios = []
    for rid, (pred, through) in predicted.items():
        if through <= 512:               # in the first step, with arrivals behind it
            assert pred <= 2 * actual[rid] and actual[rid] <= pred + full_step, (rid, pred, actual[rid])
        else:
            ratios.append(pred / actual[rid])
    assert len(ratios) > 200
    assert 0.5 <= min(ratios) and max(ratios) <= 2.0, (min(ratios), max(ratios))


def test_a_cohort_gets_first_tokens_within_the_bound_or_an_honest_refusal():
    """The same burst with a 30 s bound: every admitted request's first token within it (one step of
    slack), every other refused at once, with retry-after within 2x of the time the requests
    admitted before the refusal actually took to get their first tokens."""
    clock, worker, sched, core = cohort_stack(delay_s=30.0)
    t0 = clock.t
    admitted, refused = [], []
    for i in range(300):
        try:
            core.add_request(f"b{i}", burst_prompt(i), SamplingParams(max_tokens=32, ignore_eos=True))
            admitted.append(f"b{i}")
        except QueueFullError as e:
            refused.append(e.retry_after_ms / 1000)
    while core.has_unfinished():
        core.step()
    assert 64 < len(admitted) < 300 and len(refused) == 300 - len(admitted)
    last = max(worker.first_token[rid] for rid in admitted) - t0
    assert last <= 30.0 + 0.6, last      # one full step of slack
    assert last > 15.0                   # and the bound is used, not refused early out of caution
    for retry_s in refused:
        assert 0.5 <= retry_s / last <= 2.0, (retry_s, last)


def test_decode_steps_are_predicted_by_batch_size_and_never_faster_than_prefill():
    clock = Clock()
    p = WaitPredictor(clock)
    p.observe_step(0, 4, 0.028)          # a CPU: 4 rows 28 ms, 64 rows 0.4 s
    assert p.decode_s(64) == pytest.approx(0.028)        # nothing else known: flat
    p.observe_step(400, 0, 2.0)          # 200 prompt tokens/s: 64 rows cannot take less than 0.32 s
    assert p.decode_s(64) == pytest.approx(64 / 200)
    p.observe_step(0, 64, 0.4)           # measured: used, and interpolated between the sizes
    assert p.decode_s(64) == pytest.approx(0.4)
    assert p.decode_s(34) == pytest.approx(0.028 + (0.4 - 0.028) * 30 / 60)


def test_seats_of_preempted_requests_stop_counting():
    """A preempted request goes back to the queue without a finish; the next step without prefill
    shows how many are really running."""
    p = measured(Clock())
    p.note_admitted(10)
    for _ in range(3):
        p.observe_step(0, 10, 0.02)
    assert len(p._seated) == 10
    p.observe_step(0, 6, 0.02)           # four were preempted
    assert len(p._seated) == 6
    p.note_admitted(2)                   # admitted after that step was planned: not trimmed
    p.observe_step(0, 6, 0.02)
    assert len(p._seated) == 8


# ---- the forecast the router's gate refuses on, and re-predicting the queue -------------------------
@pytest.mark.parametrize("limit_s", [10.0, 20.0, 30.0, 45.0])
def test_the_heartbeat_forecast_refuses_the_same_arrivals_as_the_batcher(limit_s):
    """The router refuses a burst's tail before tokenizing it, from the forecast in the batcher's
    heartbeat (Scheduler.forecast -> Heartbeat.forecast_* -> router/admission_gate.py). Interpolated
    there, it must turn to refusals at the very arrival where the batcher's own check does, including
    where a whole round of seats must turn over first (the wait jumps by a generation there)."""
    from common.replicas import ReplicaView
    from protos.switchyard.v1 import bus_pb2
    from router.admission_gate import forecast_wait_s

    clock, worker, sched, core = cohort_stack(delay_s=limit_s)
    arrivals, waits, room = sched.forecast()
    assert arrivals == sorted(arrivals) and len(arrivals) == len(waits) and room == 10_000 + 64
    assert waits == sorted(waits)                       # a later arrival never waits less
    view = ReplicaView("w0", bus_pb2.Heartbeat(forecast_arrivals=arrivals,
                                               forecast_wait_ms=[1000 * w for w in waits]), 0.0)
    router_first = next(n for n in range(1, 513) if forecast_wait_s(view, n) > limit_s)
    batcher_first = None
    for i in range(300):
        try:
            core.add_request(f"b{i}", burst_prompt(i), SamplingParams(max_tokens=32, ignore_eos=True))
        except QueueFullError:
            batcher_first = batcher_first or i + 1
    assert batcher_first is not None and router_first == batcher_first, (router_first, batcher_first)


def test_no_forecast_before_anything_is_measured():
    s = scheduler(WaitPredictor(Clock()), seats=4, max_waiting=8)
    assert s.forecast() == ([], [], 8 + 4)


def test_a_queued_request_predicted_to_miss_its_deadline_is_refused_while_it_waits():
    """Predictions made on arrival can be too hopeful (here the worker slows down by half after the
    burst, as a CPU does when big steps run). Re-predicted from where each waiting request stands,
    those that would miss their deadline are refused while they wait (a client can still go
    elsewhere), and no request is left to wait out its deadline. Without the re-prediction, some
    would get no first token before their deadline."""
    clock, worker, sched, core = cohort_stack(delay_s=0.0)
    sched.wall_clock = clock                         # deadlines on the simulated clock
    deadline_s = 30.0
    admitted, refused_late = {}, set()
    for i in range(300):
        try:
            core.add_request(f"b{i}", burst_prompt(i), SamplingParams(max_tokens=32, ignore_eos=True),
                             deadline_unix_ms=int((clock.t + deadline_s) * 1000))
            admitted[f"b{i}"] = clock.t
        except QueueFullError:
            pass
    assert 64 < len(admitted) < 300
    slow = worker.execute

    def slower(plan):
        t = clock.t
        res = slow(plan)
        clock.t += 0.5 * (clock.t - t)
        res.execute_ms *= 1.5
        return res
    worker.execute = slower
    assert sched.hopeless_waiting() == []            # nothing slower measured yet
    while core.has_unfinished():
        core.step()
        for req, retry_ms in sched.hopeless_waiting():
            assert req.status == RequestStatus.WAITING and 0 < retry_ms <= 60_000
            refused_late.add(req.request_id)
            core.abort(req.request_id)
        assert sched.hopeless_waiting() == []        # at most every HOPELESS_EVERY_S
    assert refused_late
    late = {rid: worker.first_token.get(rid, float("inf")) - t for rid, t in admitted.items()
            if rid not in refused_late}
    full_step = 512 * 0.006 * 1.5 + 64 * 0.008 * 1.5
    assert max(late.values()) <= deadline_s + full_step, max(late.values())
