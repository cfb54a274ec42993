"""Request migration with real processes (issue 16 item 3): 2 workers on SmolLM2, greedy streams in
flight, SIGKILL one worker. Every stream completes, and its whole text and token ids equal the same
request run undisturbed (no token lost or repeated at the seam); the router counts the migrations in
switchyard_router_migrations_total. With migration_limit = 0 the streams on the killed worker fail
with UNAVAILABLE naming the cause instead.
"""
from __future__ import annotations

import asyncio
import signal

import grpc
import pytest

from tests.e2e.conftest import channel, start_stack
from tests.e2e.faults import Stream, metric, request, signal_group, state, undisturbed, wait_until

N_STREAMS = 4
MAX_TOKENS = 160   # long enough to be mid-stream at the kill on a fast box


def two_workers(tmp_path_factory, name: str, **kw):
    # least_loaded: the streams spread over both workers whatever their prompts share
    return start_stack(tmp_path_factory.mktemp(name), workers=2, routing_policy="least_loaded", **kw)


@pytest.fixture(scope="module")
def migrating(tmp_path_factory):
    h = two_workers(tmp_path_factory, "migrating")
    yield h
    leftovers = h.stop()
    assert not leftovers, f"processes outlived the stack stop: {leftovers}"


async def kill_a_worker_mid_stream(h, n: int, max_tokens: int) -> tuple[list[Stream], str]:
    """n streams; once each has a token, SIGKILL the worker of stream 0; returns them all ended."""
    from protos.switchyard.v1 import inference_pb2_grpc
    async with channel(h.router) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        streams = [Stream(stub, request(i, max_tokens)) for i in range(n)]
        await wait_until("every stream has a token, stream 0 a few", lambda: all(
            s.got or s.error for s in streams) and len(streams[0].got) >= 4, 120, every=0.01)
        victim = streams[0].worker
        assert not streams[0].finished, "the stream must still be running when its worker dies"
        signal_group(state(h)["workers"][victim]["worker_pid"], signal.SIGKILL)
        await asyncio.wait_for(asyncio.gather(*(s.task for s in streams)), 240)
    return streams, victim


def test_streams_of_a_killed_worker_complete_on_the_survivor(migrating):
    h = migrating
    reference = asyncio.run(undisturbed(h.router, N_STREAMS, MAX_TOKENS))
    before = metric(h, "router", "switchyard_router_migrations_total")
    streams, victim = asyncio.run(kill_a_worker_mid_stream(h, N_STREAMS, MAX_TOKENS))
    on_victim = [s for s in streams if s.worker == victim]
    assert on_victim, "no stream was on the killed worker"
    for i, s in enumerate(streams):
        assert s.error is None, f"stream {i} (on {s.worker}) failed: {s.error.code()} {s.error.details()}"
        assert s.finished and s.got[-1].usage.completion_tokens == MAX_TOKENS
        assert (s.text, s.token_ids) == reference[i], f"stream {i} (on {s.worker}) differs from the undisturbed run"
    moved = metric(h, "router", "switchyard_router_migrations_total") - before
    assert moved >= 1, "the router counted no migration"


def test_migration_limit_zero_fails_with_the_cause(tmp_path_factory):
    h = two_workers(tmp_path_factory, "no-migration", migration_limit=0)
    try:
        streams, victim = asyncio.run(kill_a_worker_mid_stream(h, 2, MAX_TOKENS))
        failed = [s for s in streams if s.worker == victim]
        assert failed
        for s in failed:
            assert s.error is not None and s.error.code() == grpc.StatusCode.UNAVAILABLE, s.error
            msg = s.error.details()
            assert "migration is off" in msg and victim in msg, msg
            assert "died" in msg or "stopped responding" in msg, msg
        for s in streams:
            if s.worker != victim:
                assert s.error is None and s.finished
        assert metric(h, "router", "switchyard_router_migrations_total") == 0
    finally:
        leftovers = h.stop()
    assert not leftovers, f"processes outlived the stack stop: {leftovers}"
