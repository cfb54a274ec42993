"""Fair shares by token cost (Virtual Token Counter), service classes and deadlines in the scheduler
(batcher/scheduler.py), driven step by step with a fake worker: no model, so every count is exact."""
from __future__ import annotations

from batcher.engine_core import EngineCore
from batcher.request import Request, RequestStatus
from batcher.scheduler import Scheduler
from kv_manager.block_allocator import BlockAllocator
from workers.engine.plan import StepPlan, StepResult
from workers.engine.sampling_params import SamplingParams

BS = 16


class FakeTokenizer:
    eos_token_ids = [0]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


class FakeWorker:
    """Mirrors each request's length like the worker and samples token 7 whenever a chunk reaches
    the end of what it knows (the scheduler's plans must add up)."""

    def __init__(self):
        self.seqs: dict[str, list[int]] = {}   # request id -> [tokens known, tokens computed]
        self.plans: list[StepPlan] = []

    def execute(self, plan: StepPlan) -> StepResult:
        self.plans.append(plan)
        for rid in plan.finished_ids:
            self.seqs.pop(rid, None)
        work = [(nr.request_id, nr.num_new_tokens) for nr in plan.new_requests]
        for nr in plan.new_requests:
            self.seqs[nr.request_id] = [len(nr.token_ids), nr.num_computed_tokens]
        work += [(rr.request_id, rr.num_new_tokens) for rr in plan.running]
        res = StepResult(step_id=plan.step_id, execute_ms=1.0)
        for rid, n in work:
            s = self.seqs[rid]
            s[1] += n
            assert s[1] <= s[0]
            if s[1] == s[0]:
                s[0] += 1
                res.request_ids.append(rid)
                res.token_ids.append(7)
        return res


def make_core(num_blocks=512, max_num_seqs=8, budget=64, max_model_len=9000, max_waiting=10_000):
    alloc = BlockAllocator(num_blocks, BS, enable_prefix_caching=False)
    sched = Scheduler(alloc, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                      max_model_len=max_model_len, max_waiting=max_waiting)
    return EngineCore(sched, FakeWorker(), FakeTokenizer()), alloc


class Client:
    """Numbers each tenant's requests and gives each a distinct prompt (no prefix sharing)."""

    def __init__(self, core: EngineCore):
        self.core = core
        self.n = 0

    def send(self, tenant: str, prompt_len: int, max_tokens: int = 4, weight: float = 1.0, **kw) -> str:
        self.n += 1
        rid = f"{tenant}-{self.n}"
        prompt = [1 + (self.n * 7919 + j) % 5000 for j in range(prompt_len)]
        self.core.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                              tenant=tenant, tenant_weight=weight, **kw)
        return rid


def admitted(core: EngineCore, since: int = 0) -> list[str]:
    """Request ids in the order they were first sent to the worker."""
    return [nr.request_id for p in core.runner.plans[since:] for nr in p.new_requests]


def served(core: EngineCore) -> dict[str, int]:
    return {t: s.prefill_tokens + s.decode_tokens for t, s in core.scheduler.tenant_tokens().items()}


def test_shares_follow_weights_in_tokens_not_requests():
    """A sends 8K-token prompts, B and C 100-token ones; weights 1:1:2. While all three are
    backlogged, the tokens each is served come within 10% of 1/4, 1/4, 1/2: the long prompts do
    not buy A more than its share, and C's weight doubles its tokens."""
    core, _ = make_core(num_blocks=4096, max_num_seqs=64, budget=512)
    client = Client(core)
    spec = {"A": (8000, 1.0), "B": (100, 1.0), "C": (100, 2.0)}

    def top_up():
        tokens = core.scheduler.tenant_tokens()
        for t, (plen, w) in spec.items():
            for _ in range(3 - (tokens[t].waiting if t in tokens else 0)):
                client.send(t, plen, max_tokens=4, weight=w)

    for _ in range(200):             # warm up: every tenant running and backlogged
        top_up()
        core.step()
    start = served(core)
    for _ in range(2000):
        top_up()
        core.step()
    end = served(core)
    got = {t: end[t] - start[t] for t in spec}
    total = sum(got.values())
    assert total > 900_000           # the budget was used: 2000 steps x 512 tokens, nearly all
    for t, want in (("A", 0.25), ("B", 0.25), ("C", 0.5)):
        share = got[t] / total
        assert abs(share / want - 1) < 0.10, (t, share, got)


def test_fifo_within_a_tenant_and_priority_first():
    core, _ = make_core(max_num_seqs=1)
    client = Client(core)
    ids = [client.send("A", 8) for _ in range(3)]
    urgent = client.send("A", 8, priority=5)
    while core.has_unfinished():
        core.step()
    assert admitted(core) == [urgent, *ids]


def test_tenants_alternate_by_counter_and_idling_banks_no_credit():
    """One seat. A has been served alone; B arrives and is lifted to A's counter, so they alternate
    (B does not get every seat until it has 'caught up' on the service A had while B was idle)."""
    core, _ = make_core(max_num_seqs=1)
    client = Client(core)
    for _ in range(4):
        client.send("A", 30)
    core.step()
    core.step()
    a_counter = core.scheduler.tenant_tokens()["A"].counter
    for _ in range(4):
        client.send("B", 30)
    assert core.scheduler.tenant_tokens()["B"].counter >= a_counter * 0.9
    while core.has_unfinished():
        core.step()
    order = [rid[0] for rid in admitted(core)]
    assert order[0] == "A"
    later = "".join(order[1:])
    assert "BBB" not in later and "AAA" not in later, order   # no tenant gets a run of seats


def test_a_tenant_returning_from_idle_starts_at_the_active_minimum():
    core, _ = make_core(max_num_seqs=2)
    client = Client(core)
    client.send("B", 20)               # B is served once, then idles
    for _ in range(8):
        client.send("A", 40)
    for _ in range(40):
        core.step()
    t = core.scheduler.tenant_tokens()
    assert t["B"].waiting == t["B"].running == 0 and t["A"].counter > 3 * t["B"].counter
    client.send("B", 20)
    t = core.scheduler.tenant_tokens()
    assert t["B"].counter == t["A"].counter   # lifted: its idle time is not credit


def test_preemption_picks_the_tenant_above_its_share():
    """KV runs out: the running request preempted is one of A's (A was served far more), never B's,
    although B's request is the newest and lowest priority."""
    core, alloc = make_core(num_blocks=12, max_num_seqs=8, budget=256)
    client = Client(core)
    client.send("A", 64, max_tokens=60)
    client.send("A", 64, max_tokens=60)
    core.step()
    b = client.send("B", 16, max_tokens=60, priority=-3)
    steps = 0
    while core.scheduler.num_preemptions == 0 and steps < 200:
        core.step()
        steps += 1
    assert core.scheduler.num_preemptions >= 1
    reqs = core.scheduler.requests
    assert reqs[b].num_preemptions == 0
    assert any(r.num_preemptions for rid, r in reqs.items() if rid.startswith("A"))
    while core.has_unfinished():
        core.step()
    assert alloc.num_free_blocks == alloc.num_blocks


def test_batch_is_preempted_before_interactive_when_memory_runs_out():
    core, _ = make_core(num_blocks=12, max_num_seqs=8, budget=256)
    client = Client(core)
    inter = client.send("A", 64, max_tokens=60)
    bulk = client.send("A", 64, max_tokens=60, service_class="batch")
    core.step()
    while core.scheduler.num_preemptions == 0:
        core.step()
    reqs = core.scheduler.requests
    assert reqs[bulk].num_preemptions >= 1 and reqs[inter].num_preemptions == 0


def test_batch_yields_a_seat_to_interactive_within_one_step():
    """Every seat is held by batch requests decoding: an interactive arrival is in the very next
    plan (a batch request is preempted for its seat), so it waits at most the step in flight."""
    core, _ = make_core(max_num_seqs=2)
    client = Client(core)
    bulk = [client.send("jobs", 8, max_tokens=100, service_class="batch") for _ in range(3)]
    for _ in range(5):
        core.step()
    assert {r.request_id for r in core.scheduler.running} == set(bulk[:2])
    n = len(core.runner.plans)
    rid = client.send("A", 8, max_tokens=4)      # empty service_class: interactive
    core.step()
    assert admitted(core, n) == [rid]
    assert core.scheduler.num_preemptions == 1


def test_batch_fills_only_the_budget_interactive_leaves():
    """A long batch prefill would take the whole token budget; an interactive arrival is planned first."""
    core, _ = make_core(budget=64)
    client = Client(core)
    client.send("jobs", 600, max_tokens=2, service_class="batch")
    core.step()
    n = len(core.runner.plans)
    rid = client.send("A", 40, max_tokens=2)
    core.step()
    plan = core.runner.plans[n]
    assert [nr.request_id for nr in plan.new_requests] == [rid]
    assert plan.new_requests[0].num_new_tokens == 40            # its whole prompt, first
    assert sum(r.num_new_tokens for r in plan.running) == 24    # the batch prefill got the rest


class FakeWall:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_waiting_requests_past_their_deadline_are_dropped_and_hold_nothing():
    wall = FakeWall()
    alloc = BlockAllocator(8, BS, enable_prefix_caching=False)
    sched = Scheduler(alloc, max_num_seqs=1, max_num_batched_tokens=64, max_model_len=128, wall_clock=wall)
    sp = SamplingParams(max_tokens=40, ignore_eos=True)
    running = Request("run", list(range(1, 40)), sp, seed=0, deadline_unix_ms=int(wall.t * 1000) + 500)
    late = Request("late", list(range(1, 40)), sp, seed=0, deadline_unix_ms=int(wall.t * 1000) + 500)
    patient = Request("patient", list(range(1, 40)), sp, seed=0, deadline_unix_ms=int(wall.t * 1000) + 60_000)
    for r in (running, late, patient):
        sched.add(r)
    sched.schedule()                              # "run" takes the one seat and its blocks
    used = alloc.num_blocks - alloc.num_free_blocks
    assert sched.expired_waiting() == []          # nothing expired yet
    wall.t += 1.0
    dropped = sched.drop_expired()
    assert dropped == [late]                      # the running one is the router's to cancel
    assert late.status == RequestStatus.FINISHED_ABORTED and "late" not in sched.requests
    assert sched.num_waiting == 1 and sched.stats().num_deadline_drops == 1
    assert alloc.num_blocks - alloc.num_free_blocks == used   # "late" held none and holds none
    sched.finish(running, RequestStatus.FINISHED_ABORTED)
    sched.finish(patient, RequestStatus.FINISHED_ABORTED)
    assert alloc.num_free_blocks == alloc.num_blocks


def test_preempted_request_past_its_deadline_is_dropped_with_its_blocks_freed():
    wall = FakeWall()
    alloc = BlockAllocator(6, BS, enable_prefix_caching=False)
    sched = Scheduler(alloc, max_num_seqs=4, max_num_batched_tokens=128, max_model_len=128, wall_clock=wall)
    core = EngineCore(sched, FakeWorker(), FakeTokenizer())
    sp = SamplingParams(max_tokens=60, ignore_eos=True)
    core.add_request("old", list(range(1, 33)), sp)
    core.add_request("new", list(range(1, 33)), sp, deadline_unix_ms=int(wall.t * 1000) + 100)
    while sched.num_preemptions == 0:
        core.step()
    victim = sched.requests["new"]
    assert victim.status == RequestStatus.WAITING and not victim.block_ids
    wall.t += 1.0
    assert [r.request_id for r in sched.drop_expired()] == ["new"]
    while core.has_unfinished():
        core.step()
    assert alloc.num_free_blocks == alloc.num_blocks


def test_per_tenant_tokens_reach_the_batcher_metrics():
    from prometheus_client import CollectorRegistry

    from telemetry.metrics import TENANT_PROCESSED_TOKENS, BatcherMetrics
    core, _ = make_core()
    client = Client(core)
    client.send("A", 40, max_tokens=5)
    client.send("B", 20, max_tokens=3, weight=2.0)
    registry = CollectorRegistry()
    metrics = BatcherMetrics("m", "w0", 1.0, registry)

    def exported(tenant, phase):
        return registry.get_sample_value(f"{TENANT_PROCESSED_TOKENS}_total",
                                         {"model": "m", "worker": "w0", "tenant": tenant, "phase": phase})
    for steps in (2, 50):                # counters follow the totals from one heartbeat to the next
        for _ in range(steps):
            core.step()
        metrics.update_from_stats(core.stats())
        tokens = core.scheduler.tenant_tokens()
        for t in ("A", "B"):
            assert exported(t, "prefill") == tokens[t].prefill_tokens
            assert exported(t, "decode") == tokens[t].decode_tokens
    assert (exported("A", "prefill"), exported("A", "decode")) == (40, 4)   # the 5th token needs no step
    assert (exported("B", "prefill"), exported("B", "decode")) == (20, 2)
