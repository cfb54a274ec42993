"""The worker's Step stream (workers/service.py) with a fake runner: results in plan order, a queued
plan starts as soon as the previous step ends (not when the event loop gets round to it), and a
failing step fails the stream with INTERNAL."""
from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from workers.engine.plan import StepPlan, StepResult
from workers.service import WorkerServicer
from workers.step_codec import plan_to_proto


class FakeRunner:
    def __init__(self, on_execute=None):
        self.executed: list[int] = []
        self.seqs: dict = {}
        self.on_execute = on_execute

    def execute(self, plan: StepPlan) -> StepResult:
        self.executed.append(plan.step_id)
        if self.on_execute is not None:
            self.on_execute(plan)
        return StepResult(step_id=plan.step_id, request_ids=["r"], token_ids=[plan.step_id])


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self):
        self.code = None

    async def abort(self, code, message):
        self.code = (code, message)
        raise Aborted(message)


def servicer(runner) -> WorkerServicer:
    s = WorkerServicer(runner, "fake-model")
    s.ready = True
    return s


async def plans(*step_ids: int):
    for i in step_ids:
        yield plan_to_proto(StepPlan(step_id=i))


async def collect(svc, ctx, it) -> list[int]:
    return [r.step_id async for r in svc.Step(it, ctx)]


def test_results_come_back_in_plan_order():
    runner = FakeRunner()
    out = asyncio.run(collect(servicer(runner), FakeContext(), plans(1, 2, 3, 4)))
    assert out == [1, 2, 3, 4]
    assert runner.executed == [1, 2, 3, 4]


def test_a_queued_plan_starts_while_the_event_loop_is_busy():
    """Step 1 ends by occupying the event loop until step 2 has started. Step 2 was sent before
    step 1 ended (a pipelining batcher), so the step thread must start it by itself; a worker
    that needs its loop between steps would only start it after the loop is free again."""
    step2_started = threading.Event()
    seen: list[bool] = []

    async def main():
        loop = asyncio.get_running_loop()

        def busy_loop():   # runs on the event loop
            seen.append(step2_started.wait(timeout=10))

        def on_execute(plan):   # runs on the step thread
            if plan.step_id == 1:
                loop.call_soon_threadsafe(busy_loop)
            elif plan.step_id == 2:
                step2_started.set()

        return await collect(servicer(FakeRunner(on_execute)), FakeContext(), plans(1, 2))

    assert asyncio.run(main()) == [1, 2]
    assert seen == [True], "step 2 waited for the event loop"


def test_a_failing_step_fails_the_stream_with_internal():
    def on_execute(plan):
        if plan.step_id == 2:
            raise RuntimeError("engine bug")

    runner = FakeRunner(on_execute)
    ctx = FakeContext()
    got: list[int] = []

    async def main():
        async for r in servicer(runner).Step(plans(1, 2, 3), ctx):
            got.append(r.step_id)

    with pytest.raises(Aborted):
        asyncio.run(main())
    assert got == [1]
    assert ctx.code[0] == grpc.StatusCode.INTERNAL and "step 2" in ctx.code[1] and "engine bug" in ctx.code[1]


class OverlappingRunner(FakeRunner):
    """A runner whose launch() only enqueues (CUDA): records launches and result reads in order."""
    overlaps = True

    def __init__(self):
        super().__init__()
        self.events: list[str] = []

    def launch(self, plan: StepPlan):
        self.events.append(f"launch {plan.step_id}")
        runner = self

        class Handle:
            def result(self) -> StepResult:
                runner.events.append(f"result {plan.step_id}")
                return StepResult(step_id=plan.step_id, request_ids=["r"], token_ids=[plan.step_id])
        return Handle()


def test_an_overlapping_runner_launches_a_queued_plan_before_reading_the_previous_tokens():
    """All plans are sent at once (a pipelining batcher): each next step is launched before the
    previous step's tokens are read, so the device always has the next step queued."""
    runner = OverlappingRunner()
    out = asyncio.run(collect(servicer(runner), FakeContext(), plans(1, 2, 3)))
    assert out == [1, 2, 3]
    assert runner.events.index("launch 2") < runner.events.index("result 1")
    assert runner.events.index("launch 3") < runner.events.index("result 2")
    assert [e for e in runner.events if e.startswith("result")] == ["result 1", "result 2", "result 3"]
