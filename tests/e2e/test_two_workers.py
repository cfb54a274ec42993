"""A 2-worker stack: spreading, KV-locality routing, a worker SIGKILLed, SIGTERM shutdown.

Tests run in file order and share one stack; the last one shuts it down.
"""
from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest

from protos.switchyard.v1 import common_pb2, inference_pb2_grpc
from tests.e2e.conftest import channel, collect, gen_request, pid_alive, start_stack


@pytest.fixture(scope="module")
def stack2(tmp_path_factory):
    h = start_stack(tmp_path_factory.mktemp("stack2"), workers=2, drain_grace_s=20.0)
    yield h
    leftovers = h.stop()
    assert not leftovers, f"processes outlived the stack stop: {leftovers}"


def _run(coro):
    return asyncio.run(coro)


def test_both_workers_take_traffic(stack2):
    async def main():
        async with channel(stack2.router) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            return await asyncio.gather(*(collect(stub, gen_request(f"Item {i}:", max_tokens=4)) for i in range(8)))
    results = _run(main())
    workers = [resps[-1].usage.worker_id for _, _, resps in results]
    assert set(workers) == {"w0", "w1"}, workers


def test_shared_long_prefix_prefers_the_worker_that_holds_it(stack2):
    prefix = ("You are a meticulous assistant for a railway switchyard. Always answer with the track number, "
              "the time of departure and the name of the dispatcher on duty. ") * 4   # ~13 blocks

    async def main():
        async with channel(stack2.router) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            _, _, first = await collect(stub, gen_request(prefix + "Question 0?", max_tokens=2))
            holder = first[-1].usage.worker_id
            # Wait until the KV index has the holder's blocks (KV events travel over NATS).
            deadline = time.monotonic() + 60
            while stack2.worker_status(holder)["indexed_blocks"] < 8:
                assert time.monotonic() < deadline, stack2.status()
                await asyncio.sleep(0.1)
            later = []
            for i in range(1, 5):
                _, _, resps = await collect(stub, gen_request(prefix + f"Question {i}?", max_tokens=2))
                later.append(resps[-1].usage)
            return holder, later
    holder, later = _run(main())
    assert [u.worker_id for u in later] == [holder] * 4
    assert all(u.cached_tokens >= 8 * 16 for u in later), [u.cached_tokens for u in later]


def test_worker_sigkill_moves_its_streams_and_traffic(stack2):
    """4 long streams over both workers; SIGKILL w0. Its streams continue on w1 (request migration,
    issue 16: tests/e2e/test_migration.py checks the text) and all four finish, none fails; while w0
    is down, new requests go to w1."""
    victim = "w0"
    victim_pid = stack2.state["workers"][victim]["worker_pid"]
    first_token: dict[int, str] = {}

    async def stream(stub, i):
        req = gen_request(f"Write a long essay about topic {i}.", max_tokens=300)
        req.sampling.ignore_eos = True   # every stream must still be running when the worker dies
        call = stub.Generate(req, timeout=120)
        worker, n = None, 0
        try:
            async for r in call:
                worker = worker or r.worker_id
                first_token.setdefault(i, worker)
                n += len(r.token_ids)
            return worker, "finished", n
        except grpc.aio.AioRpcError as e:
            return worker, e.code(), n

    async def main():
        async with channel(stack2.router) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            tasks = [asyncio.create_task(stream(stub, i)) for i in range(4)]
            # Every stream has its first token, both workers have two: then kill the worker under half.
            deadline = time.monotonic() + 120
            while len(first_token) < 4:
                assert time.monotonic() < deadline, first_token
                assert not any(t.done() for t in tasks), [t.result() for t in tasks if t.done()]
                await asyncio.sleep(0.05)
            os.kill(victim_pid, signal.SIGKILL)
            # Once the router has taken w0 out (its batcher reports the worker lost at once), new
            # requests go to the survivor; w0 needs seconds to come back (restart + model load).
            while (w := next((w for w in stack2.status()["workers"] if w["worker_id"] == victim), None)) \
                    is not None and w["healthy"]:
                assert time.monotonic() < deadline + 30, w
                await asyncio.sleep(0.05)
            after = await asyncio.gather(*(collect(stub, gen_request(f"After {i}", max_tokens=3), timeout=60)
                                           for i in range(3)))
            done = await asyncio.wait_for(asyncio.gather(*tasks), 110)
            return done, after
    done, after = _run(main())
    assert sorted(first_token.values()) == ["w0", "w0", "w1", "w1"], first_token
    assert [(c, n) for _, c, n in done] == [("finished", 300)] * 4, done
    assert [resps[-1].usage.worker_id for _, _, resps in after] == ["w1"] * 3
    assert not pid_alive(victim_pid)


def test_sigterm_drains_in_flight_streams_then_stops_every_child(stack2):
    async def main():
        async with channel(stack2.router) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            call = stub.Generate(gen_request("List ten fruits:", max_tokens=12), timeout=120)
            it = call.__aiter__()
            first = await it.__anext__()
            stack2.sigterm()                      # `switchyard up` gets SIGTERM mid-stream
            rest = [r async for r in _rest(it)]
            return [first, *rest]
    resps = _run(main())
    assert resps[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert sum(len(r.token_ids) for r in resps) == 12
    stack2.proc.wait(60)
    assert stack2.proc.returncode == 0
    deadline = time.monotonic() + 30      # a child the kernel is still reaping
    while (alive := [p for p in stack2.all_pids() if pid_alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, f"orphans after SIGTERM: {alive}"


async def _rest(it):
    while True:
        try:
            yield await it.__anext__()
        except StopAsyncIteration:
            return
