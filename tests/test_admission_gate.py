"""The router's admission gate (router/admission_gate.py): a request that no replica's heartbeat
forecast says could get its first token within its deadline or max_queue_delay_ms is refused at once,
before tokenizing, with retry-after; the others go only to replicas that could serve them in time.
(That the forecast turns to refusals at the same arrival as the batcher's own check:
tests/test_honest_admission.py.)"""
from __future__ import annotations

import asyncio

import grpc
import pytest

from common.config import StackConfig
from common.replicas import ReplicaTable, ReplicaView
from protos.switchyard.v1 import bus_pb2, inference_pb2
from router.admission_gate import arrival, check, forecast_wait_s

ARRIVALS = [1, 2, 4, 64, 65, 128]
WAITS_MS = [0.0, 100.0, 300.0, 2000.0, 12000.0, 14000.0]


def hb(wid: str = "w0", waits_ms=WAITS_MS, arrivals=ARRIVALS, room: int | None = None, model: str = "m"):
    h = bus_pb2.Heartbeat(worker_id=wid, model=model, healthy=True, block_size=16, max_model_len=2048,
                          forecast_arrivals=arrivals, forecast_wait_ms=waits_ms)
    if room is not None:
        h.queue_room = room
    return h


def view(**kw) -> ReplicaView:
    return ReplicaView("w0", hb(**kw), 0.0)


# ---- the forecast -----------------------------------------------------------------------------------
def test_forecast_is_interpolated_between_points_and_continued_beyond_them():
    v = view()
    assert forecast_wait_s(v, 1) == 0.0 and forecast_wait_s(v, 64) == 2.0
    assert forecast_wait_s(v, 3) == pytest.approx(0.2)                  # between 2 and 4
    assert forecast_wait_s(v, 65) == 12.0                                # the jump of a seat round is a point
    assert forecast_wait_s(v, 192) == pytest.approx(14.0 + 2.0 * 64 / 63)  # the last segment, continued
    assert forecast_wait_s(view(arrivals=[], waits_ms=[]), 5) is None    # nothing measured: no forecast


def test_the_next_request_is_judged_as_the_arrival_after_what_was_sent_since_the_heartbeat():
    t = ReplicaTable()
    w = t.observe(hb(), now=0.0)
    assert arrival(w) == 1
    w.sent_since_beat, w.in_flight = 10, 10
    assert arrival(w) == 11
    w.in_flight = 3                     # 7 of them ended already: they are ahead of nobody
    assert arrival(w) == 4
    t.observe(hb(), now=0.5)            # the new heartbeat counts what it has seen
    assert arrival(w) == 1


# ---- the decision -----------------------------------------------------------------------------------
def test_refuses_when_no_replica_can_meet_the_limit_with_the_least_wait_as_retry_after():
    a, b = view(), ReplicaView("w1", hb("w1", waits_ms=[w * 2 for w in WAITS_MS]), 0.0)
    for v in (a, b):
        v.sent_since_beat = v.in_flight = 64                             # the next is arrival 65
    ok, refusal = check([a, b], 5.0, "its deadline", "m")
    assert ok == [] and refusal is not None
    assert refusal.retry_after_ms == 12000                                # the sooner replica's wait
    assert "12000 ms exceeds its deadline (5000 ms)" in refusal.message and "'m'" in refusal.message
    ok, refusal = check([a, b], 13.0, "max_queue_delay_ms", "m")        # a can, b cannot
    assert ok == [a] and refusal is None


def test_a_replica_without_a_forecast_is_never_refused_on_one():
    ok, refusal = check([view(arrivals=[], waits_ms=[])], 0.001, "its deadline", "m")
    assert refusal is None and len(ok) == 1
    assert check([], 1.0, "its deadline", "m") == ([], None)             # no replica: routing says so


def test_a_full_waiting_queue_is_refused_whatever_the_wait():
    v = view(room=3)
    v.sent_since_beat = v.in_flight = 3
    ok, refusal = check([v], 60.0, "its deadline", "m")
    assert ok == [] and "waiting queue is full" in refusal.message and refusal.retry_after_ms == 300
    assert check([view(room=4)], 60.0, "its deadline", "m")[1] is None


# ---- in the router's Generate ----------------------------------------------------------------------
class _Sub:
    async def unsubscribe(self):
        pass


class FakeNats:
    """Records what the router publishes; no chunks ever come back."""
    max_payload = 1 << 20

    def __init__(self):
        self.published: list[str] = []

    async def subscribe(self, subject, cb=None):
        return _Sub()

    async def publish(self, subject, data, headers=None):
        if subject.startswith("sy.req."):   # requests (not the cancels of the streams the tests end)
            self.published.append(subject)


class Aborted(Exception):
    pass


class Context:
    def __init__(self, remaining_s: float | None):
        self.remaining_s = remaining_s
        self.aborted: tuple | None = None

    def time_remaining(self):
        return self.remaining_s

    def invocation_metadata(self):
        return ()

    async def abort(self, code, message, trailing_metadata=()):
        self.aborted = (code, message, dict(trailing_metadata))
        raise Aborted(message)


class CountingTokenizer:
    vocab_size = 1000
    calls = 0

    def encode(self, text):
        CountingTokenizer.calls += 1
        return [5, 6, 7]


@pytest.fixture
def router():
    from router.service import Router
    cfg = StackConfig(model="m")
    r = Router(cfg, FakeNats(), None, tokenizer_loader=lambda m: CountingTokenizer())
    CountingTokenizer.calls = 0
    yield r
    r._tokenize_pool.shutdown(wait=False)


def generate(router, ctx: Context, service_class: str = "") -> None:
    req = inference_pb2.GenerateRequest(model="m", prompt="hello", service_class=service_class)
    req.sampling.max_tokens = 8

    async def first():
        gen = router.Generate(req, ctx)
        task = asyncio.ensure_future(gen.__anext__())
        for _ in range(20):              # published by now, or refused
            await asyncio.sleep(0)
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Aborted, StopAsyncIteration):
            pass
    asyncio.run(first())


def test_generate_refuses_before_tokenizing_when_every_replica_would_miss_the_deadline(router):
    router.table.observe(hb(waits_ms=[9000.0] * len(ARRIVALS)))
    ctx = Context(remaining_s=5.0)
    generate(router, ctx)
    code, message, trailers = ctx.aborted
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "exceeds its deadline" in message
    assert trailers["retry-after-ms"] == "9000"
    assert CountingTokenizer.calls == 0 and router.nc.published == []    # no work was done for it


def test_generate_sends_to_the_replica_that_can_meet_the_deadline(router):
    router.table.observe(hb("w0", waits_ms=[9000.0] * len(ARRIVALS)))   # the lower id, tied load: else first
    router.table.observe(hb("w1", waits_ms=[100.0] * len(ARRIVALS)))
    ctx = Context(remaining_s=5.0)
    generate(router, ctx)
    assert ctx.aborted is None and router.nc.published == ["sy.req.w1"]
    assert router.table.workers["w1"].sent_since_beat == 1


def test_batch_class_and_unbounded_requests_are_not_refused_on_the_forecast(router):
    router.cfg.max_queue_delay_ms = 0                                    # deadlines only
    router.table.observe(hb(waits_ms=[9000.0] * len(ARRIVALS)))
    generate(router, Context(remaining_s=None))                          # no deadline, no bound
    generate(router, Context(remaining_s=5.0), service_class="batch")    # waits for idle capacity by design
    assert router.nc.published == ["sy.req.w0", "sy.req.w0"]

