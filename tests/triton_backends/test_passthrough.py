"""Stack A serves the model through a Triton backend pointed at stack B's Triton-protocol port."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from tests.e2e.conftest import channel, collect, gen_request
from tests.triton_backends.conftest import MODEL

PROMPT = "Trains switch tracks because"


def _wait_routable(stack, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(w["healthy"] for w in stack.status()["workers"]):
            return
        time.sleep(0.1)
    raise AssertionError(f"no healthy worker on {stack.router}")


def test_client_of_a_gets_bs_tokens(stack_a, stack_b):
    _wait_routable(stack_a)
    from protos.switchyard.v1 import inference_pb2_grpc

    async def run():
        async with channel(stack_a.router) as ca, channel(stack_b.router) as cb:
            a = await collect(inference_pb2_grpc.InferenceStub(ca), gen_request(PROMPT, max_tokens=12, model=MODEL))
            b = await collect(inference_pb2_grpc.InferenceStub(cb), gen_request(PROMPT, max_tokens=12, model=MODEL))
        return a, b

    (ta, _, ra), (tb, _, rb) = asyncio.run(run())
    assert ta == tb and ta
    assert len(ra) > 2, "streamed through, not buffered"
    assert ra[-1].usage.completion_tokens == rb[-1].usage.completion_tokens == 12
    assert ra[0].worker_id == "w0" and ra[-1].finish_reason == rb[-1].finish_reason


def test_cancel_at_a_cancels_at_b(stack_a, stack_b):
    _wait_routable(stack_a)
    from protos.switchyard.v1 import inference_pb2_grpc
    gen_before = int(stack_b.worker_status_since(time.monotonic())["generation_tokens_total"])

    req = gen_request(PROMPT, max_tokens=400)
    req.sampling.ignore_eos = True

    async def run2():
        async with channel(stack_a.router) as ca:
            call = inference_pb2_grpc.InferenceStub(ca).Generate(req, timeout=60)
            n = 0
            async for _ in call:
                n += 1
                if n == 3:
                    break
            call.cancel()

    asyncio.run(run2())
    cancelled = time.monotonic()
    # B idle in a heartbeat sent after the cancel; that heartbeat's token count is final. Without the
    # cancel reaching B it would stay busy until all 400 tokens are out.
    w = stack_b.worker_status_since(cancelled, until=lambda w: w["num_running"] == 0 and w["num_waiting"] == 0)
    generated = int(w["generation_tokens_total"]) - gen_before
    assert generated < 200, f"B generated {generated} of 400 tokens after the cancel"


def test_a_rejects_when_its_queue_is_full(stack_a):
    """Pass-through admission: concurrency 4 + max_waiting 16; a burst beyond that gets RESOURCE_EXHAUSTED."""
    _wait_routable(stack_a)
    from protos.switchyard.v1 import inference_pb2_grpc

    async def one(stub):
        req = gen_request(PROMPT, max_tokens=4)
        req.sampling.ignore_eos = True
        try:
            await collect(stub, req, timeout=120)
            return "ok"
        except grpc.aio.AioRpcError as e:
            md = e.trailing_metadata()
            return (e.code(), md.get("retry-after-ms") if md is not None else None)

    async def run():
        async with channel(stack_a.router) as ca:
            stub = inference_pb2_grpc.InferenceStub(ca)
            return await asyncio.gather(*[one(stub) for _ in range(26)])

    out = asyncio.run(run())
    rejected = [o for o in out if o != "ok"]
    assert rejected and all(o[0] == grpc.StatusCode.RESOURCE_EXHAUSTED and o[1] for o in rejected), out
    assert out.count("ok") >= 20


def test_b_down_gives_unavailable_quickly(stack_a, stack_b):
    """Last in this file: stops B."""
    _wait_routable(stack_a)
    from protos.switchyard.v1 import inference_pb2_grpc
    stack_b.stop(30)

    deadline_s = 60.0

    async def run():
        async with channel(stack_a.router) as ca:
            t0 = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await collect(inference_pb2_grpc.InferenceStub(ca), gen_request(PROMPT, max_tokens=8),
                              timeout=deadline_s)
            return e.value.code(), e.value.details(), time.monotonic() - t0

    code, details, dt = asyncio.run(run())
    # UNAVAILABLE, not DEADLINE_EXCEEDED: the refused connection is reported, not waited out (nor retried
    # until the client gives up); the bound is a quarter of the deadline, not a guess at the box's speed.
    assert code == grpc.StatusCode.UNAVAILABLE, details
    assert dt < deadline_s / 4, f"took {dt:.1f}s of the {deadline_s:.0f} s deadline"
