"""The batcher's NATS edge (batcher/nats_edge.py), through both batchers that use it: the engine
batcher (batcher/service.py, with a worker whose steps the test ends) and the pass-through batcher
(batcher/passthrough.py, with a backend whose streams the test feeds). An in-memory NATS, no
processes. Waits are on events the test causes, never on the clock: drains get an hour of grace,
and a spy checks that no code under test sleeps.
"""
from __future__ import annotations

import asyncio
import time
import types

import pytest

from batcher.engine_core import build_engine_core
from batcher.passthrough import PassthroughBatcher
from batcher.service import BatcherService
from common import subjects
from common.config import StackConfig
from protos.switchyard.v1 import bus_pb2, common_pb2
from workers.backends.base import Backend, BackendChunk
from workers.engine.plan import StepPlan, StepResult

W = "w0"
HOUR = 3600.0


# ---- an in-memory NATS ---------------------------------------------------------------------------
class FakeNats:
    """subscribe / publish / unsubscribe as nats.NATS; `deliver` plays a message from the router."""

    def __init__(self):
        self.subs: list[tuple[str, object]] = []
        self.published: list[tuple[str, bytes]] = []

    async def subscribe(self, subject, cb):
        entry = (subject, cb)
        self.subs.append(entry)
        nc = self

        class Sub:
            async def unsubscribe(self):
                nc.subs.remove(entry)
        return Sub()

    async def publish(self, subject, data, headers=None):
        self.published.append((subject, data))

    async def deliver(self, subject: str, msg, reply: str = "") -> None:
        m = types.SimpleNamespace(subject=subject, data=msg.SerializeToString(), reply=reply, headers=None)
        for pattern, cb in list(self.subs):
            if pattern == subject or (pattern.endswith(".*") and subject.rsplit(".", 1)[0] == pattern[:-2]):
                await cb(m)

    def chunks(self, rid: str) -> list[bus_pb2.TokenChunk]:
        return [bus_pb2.TokenChunk.FromString(d) for s, d in self.published if s == subjects.tokens(rid)]

    def heartbeats(self) -> list[bus_pb2.Heartbeat]:
        return [bus_pb2.Heartbeat.FromString(d) for s, d in self.published if s == subjects.heartbeat(W)]

    def replies(self, subject: str) -> list[bus_pb2.ModelControlReply]:
        return [bus_pb2.ModelControlReply.FromString(d) for s, d in self.published if s == subject]


def request(rid: str, max_tokens: int = 50, temperature: float = 0.0, deadline_unix_ms: int = 0,
            adapter_id: str = "") -> bus_pb2.BatchRequest:
    r = bus_pb2.BatchRequest(request_id=rid, prompt_token_ids=list(range(1, 9)), reply_subject=subjects.tokens(rid),
                             prompt_text="eight tokens", deadline_unix_ms=deadline_unix_ms, adapter_id=adapter_id)
    r.sampling.max_tokens = max_tokens
    r.sampling.temperature = temperature
    r.sampling.ignore_eos = True
    return r


async def settle() -> None:
    """Let every task that can run, run (no clock involved)."""
    for _ in range(20):
        await asyncio.sleep(0)


# ---- the engine batcher, with a worker whose steps the test ends -----------------------------------
class Tok:
    eos_token_ids = [0]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


class GatedWorker:
    """RemoteRunner's send/receive: plans are recorded; each result is what the test hands in."""

    def __init__(self):
        self.plans: list[StepPlan] = []
        self.sent = asyncio.Event()
        self.results: asyncio.Queue[StepResult] = asyncio.Queue()

    async def send(self, plan: StepPlan, trace=None) -> None:
        self.plans.append(plan)
        self.sent.set()

    async def receive(self) -> StepResult:
        return await self.results.get()

    async def step_sent(self) -> StepPlan:
        await self.sent.wait()
        self.sent.clear()
        return self.plans[-1]

    def finish_step(self, plan: StepPlan, token: int = 7) -> None:
        """The worker ends the step: one token for each request whose prompt chunk is complete."""
        ids = [r.request_id for r in plan.new_requests] + [r.request_id for r in plan.running]
        self.results.put_nowait(StepResult(step_id=plan.step_id, request_ids=ids, token_ids=[token] * len(ids)))

    def close(self) -> None:
        pass


LIMITS = dict(enable_prefix_caching=True, max_num_seqs=4, max_num_batched_tokens=64, max_loras=2)


async def engine_batcher(nc: FakeNats, max_waiting: int = 4, max_num_seqs: int = LIMITS["max_num_seqs"]):
    cfg = StackConfig(admission_window_ms=0.0)
    svc = BatcherService(cfg, W, "127.0.0.1:1", nc)   # the channel never connects: the worker is fake
    svc.remote = worker = GatedWorker()
    limits = types.SimpleNamespace(**dict(LIMITS, max_num_seqs=max_num_seqs), max_waiting=max_waiting)
    svc.core = build_engine_core(limits, num_blocks=16, block_size=4, max_model_len=128, runner=None, tokenizer=Tok())
    svc.core.adapter_check = svc.adapters.check
    svc.model, svc.healthy = "m", True
    await svc.start_serving()
    return svc, worker


# ---- the pass-through batcher, with a backend whose streams the test feeds ---------------------------
class GatedBackend(Backend):
    name = "fake"

    def __init__(self):
        self.feeds: dict[str, asyncio.Queue] = {}
        self.closed: list[str] = []
        self.started = asyncio.Event()

    async def start(self) -> None:
        pass

    async def ready(self) -> bool:
        return True

    async def load(self) -> None:
        pass

    async def unload(self) -> None:
        pass

    def feed(self, rid: str) -> asyncio.Queue:
        return self.feeds.setdefault(rid, asyncio.Queue())

    async def generate(self, req):
        q = self.feed(req.request_id)
        self.started.set()
        try:
            while True:
                c = await q.get()
                yield c
                if c.finish_reason:
                    return
        finally:
            self.closed.append(req.request_id)   # closing the stream is how the engine hears a cancel


async def passthrough_batcher(nc: FakeNats, max_waiting: int = 4):
    backend = GatedBackend()
    pt = PassthroughBatcher(StackConfig(), W, nc, backend, max_concurrency=1, max_waiting=max_waiting)
    await pt.start()
    return pt, backend


# ---- one protocol ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["engine", "passthrough"])
def test_both_batchers_speak_the_same_protocol(kind):
    """Admission, rejects (with the error's code, field and retry-after), foreign cancels, model
    unload/load and heartbeats come from the one edge, whichever batcher is behind it."""
    async def main():
        nc = FakeNats()
        if kind == "engine":   # nothing steps: the first request has the one seat, the second the queue of one
            b, _ = await engine_batcher(nc, max_waiting=1, max_num_seqs=1)
        else:                  # the first request runs (one seat), the second fills a queue of one
            b, _ = await passthrough_batcher(nc, max_waiting=1)
        req = subjects.request(W)
        await nc.deliver(req, request("bad", temperature=-1.0))
        [bad] = nc.chunks("bad")
        assert bad.error == bus_pb2.CHUNK_ERROR_INVALID and bad.error_field == "temperature"
        assert bad.error_message.startswith("temperature: must be >= 0")

        await nc.deliver(req, request("late", deadline_unix_ms=int(time.time() * 1000) - 1))
        assert nc.chunks("late")[0].error_message == "deadline already passed"

        await nc.deliver(req, request("a"))
        await nc.deliver(req, request("b"))
        assert list(b.edge.streams) == ["a", "b"] and nc.chunks("a") == nc.chunks("b") == []

        await nc.deliver(req, request("full"))
        [full] = nc.chunks("full")
        assert full.error == bus_pb2.CHUNK_ERROR_QUEUE_FULL and full.retry_after_ms > 0

        await nc.deliver(subjects.cancel("someone-else"), bus_pb2.Cancel(request_id="someone-else"))
        assert list(b.edge.streams) == ["a", "b"]

        await nc.deliver(subjects.control(W), bus_pb2.ModelControl(action="unload"), reply="ctl.1")
        assert nc.replies("ctl.1")[0].ok and not nc.heartbeats()[-1].healthy
        await nc.deliver(req, request("while-unloaded"))
        [refused] = nc.chunks("while-unloaded")
        assert refused.error == bus_pb2.CHUNK_ERROR_UNAVAILABLE and "unloaded" in refused.error_message
        await nc.deliver(subjects.control(W), bus_pb2.ModelControl(action="load"), reply="ctl.2")
        assert nc.replies("ctl.2")[0].ok and nc.heartbeats()[-1].healthy

        hb = b.heartbeat()
        assert (hb.worker_id, hb.healthy, hb.draining) == (W, True, False)
        assert hb.num_running + hb.num_waiting == 2
        if b.metrics is not None:
            rejected = {s.labels["reason"]: s.value for m in b.metrics.rejections.collect() for s in m.samples
                        if s.name.endswith("_total")}
            assert rejected == {"queue_full": 1, "invalid": 1, "deadline": 1, "unavailable": 1}
        await b.stop()
    asyncio.run(main())


def test_an_unknown_adapter_is_not_found_with_its_field():
    async def main():
        nc = FakeNats()
        b, _ = await engine_batcher(nc)
        await nc.deliver(subjects.request(W), request("x", adapter_id="sql"))
        [c] = nc.chunks("x")
        assert c.error == bus_pb2.CHUNK_ERROR_NOT_FOUND and c.error_field == "adapter_id"
        assert "'sql' is not served by worker w0" in c.error_message
        await b.stop()
    asyncio.run(main())


# ---- cancels are confirmed once applied ------------------------------------------------------------
def test_an_abort_is_confirmed_once_the_step_loop_has_applied_it():
    """A cancel that arrives while a step is at the worker is applied when the step is back (never
    while a plan is on the wire); its future resolves only then, with the blocks freed."""
    async def main():
        nc = FakeNats()
        b, worker = await engine_batcher(nc)
        free = b.core.scheduler.allocator.num_free_blocks
        await nc.deliver(subjects.request(W), request("r"))
        step = await worker.step_sent()
        assert b.core.scheduler.allocator.num_free_blocks < free

        await nc.deliver(subjects.cancel("r"), bus_pb2.Cancel(request_id="r"))
        applied = b.cancel("r")          # the same confirmation the edge asked for
        await settle()
        assert not applied.done() and "r" in b.core.scheduler.requests   # the step is still out

        worker.finish_step(step)
        await asyncio.wait_for(applied, 5.0)
        assert "r" not in b.core.scheduler.requests and "r" not in b.edge.streams
        assert b.core.scheduler.allocator.num_free_blocks == free
        assert [c.finish_reason for c in nc.chunks("r")] == [0]   # the step's token went out; no finish
        await b.stop()
    asyncio.run(main())


def test_a_cancelled_relay_is_confirmed_when_its_backend_stream_is_closed():
    async def main():
        nc = FakeNats()
        b, backend = await passthrough_batcher(nc)
        await nc.deliver(subjects.request(W), request("r"))
        await backend.started.wait()
        backend.feed("r").put_nowait(BackendChunk(text="x", num_new_tokens=1))
        applied = b.cancel("r")
        await asyncio.wait_for(applied, 5.0)
        assert backend.closed == ["r"] and "r" not in b.edge.streams and b.heartbeat().num_running == 0
        await b.stop()
    asyncio.run(main())


# ---- drain ends with the last stream ------------------------------------------------------------------
@pytest.fixture
def sleeps(monkeypatch):
    """Every asyncio.sleep with a delay, anywhere: the code under test must have none."""
    calls: list[float] = []
    real = asyncio.sleep

    async def spy(delay, result=None):
        if delay:
            calls.append(delay)
        return await real(delay, result)
    monkeypatch.setattr(asyncio, "sleep", spy)
    return calls


@pytest.mark.parametrize("kind", ["engine", "passthrough"])
def test_drain_ends_as_soon_as_the_last_stream_finishes(kind, sleeps):
    async def main():
        nc = FakeNats()
        if kind == "engine":
            b, worker = await engine_batcher(nc)
            await nc.deliver(subjects.request(W), request("r", max_tokens=1))
            step = await worker.step_sent()
            finish = lambda: worker.finish_step(step)          # noqa: E731 - the one token it may have
        else:
            b, backend = await passthrough_batcher(nc)
            await nc.deliver(subjects.request(W), request("r", max_tokens=1))
            await backend.started.wait()
            finish = lambda: backend.feed("r").put_nowait(   # noqa: E731
                BackendChunk(text="x", num_new_tokens=1, finish_reason="length"))
        drain = asyncio.ensure_future(b.drain(HOUR))
        await settle()
        assert not drain.done() and nc.heartbeats()[-1].draining
        await nc.deliver(subjects.request(W), request("after"))
        assert "draining" in nc.chunks("after")[0].error_message

        finish()
        await asyncio.wait_for(drain, 5.0)                     # an hour of grace: only the event ends it
        assert nc.chunks("r")[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH   # out before the drain ended
        assert b.edge.streams == {}
        await b.stop()
    asyncio.run(main())
    assert sleeps == []


def test_drain_past_its_grace_aborts_and_returns_once_the_aborts_are_applied(sleeps):
    async def main():
        nc = FakeNats()
        b, worker = await engine_batcher(nc)
        await nc.deliver(subjects.request(W), request("r"))
        step = await worker.step_sent()
        drain = asyncio.ensure_future(b.drain(0.0))
        await settle()
        assert not drain.done(), "the abort cannot be applied while the step is out"
        worker.finish_step(step)
        await asyncio.wait_for(drain, 5.0)
        assert not b.core.has_unfinished() and b.edge.streams == {}
        await b.stop()
    asyncio.run(main())
    assert sleeps == []
