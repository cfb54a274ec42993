"""Liveness with real processes (issue 16 items 2 and 4): 2 workers on SmolLM2.

* SIGSTOP a worker under load: its batcher's step overruns its budget (batcher/liveness.py), the
  replica goes unhealthy within seconds, its streams move to the other worker and complete exactly as
  undisturbed, new requests avoid it, and the batcher exits with EXIT_WORKER_HUNG so the launcher
  restarts the pair, which serves again.
* SIGSTOP a batcher: dropped by the router after worker_timeout_s of silence, its streams move, and
  the cancel the router sent makes it let go of the request once it runs again.
* SIGSTOP the router while a stream with a deadline runs: the batcher drops the request when the
  deadline passes (no router is left to cancel it) and its blocks return.
"""
from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest

from batcher.liveness import EXIT_WORKER_HUNG
from tests.e2e.conftest import channel, start_stack
from tests.e2e.faults import Stream, metric, request, signal_group, state, undisturbed, wait_until, worker_view

MAX_TOKENS = 160   # long enough to be mid-stream at the stop on a fast box


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    # a long context: the deadline test needs a request that cannot finish within its deadline
    h = start_stack(tmp_path_factory.mktemp("liveness"), workers=2, routing_policy="least_loaded", max_model_len=4096)
    yield h
    leftovers = h.stop()
    assert not leftovers, f"processes outlived the stack stop: {leftovers}"


def test_a_hung_worker_is_detected_its_streams_move_and_it_restarts(live):
    h = live
    from protos.switchyard.v1 import inference_pb2_grpc
    reference = asyncio.run(undisturbed(h.router, 2, MAX_TOKENS))

    async def scenario():
        async with channel(h.router) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            streams = [Stream(stub, request(i, MAX_TOKENS)) for i in range(2)]
            await wait_until("both streams have tokens", lambda: all(len(s.got) >= 2 or s.error for s in streams), 120,
                             every=0.01)
            victim = streams[0].worker
            pid = state(h)["workers"][victim]["worker_pid"]
            signal_group(pid, signal.SIGSTOP)
            t0 = time.monotonic()
            try:
                view = await wait_until("the router sees the hung worker", lambda: (
                    (w := worker_view(h, victim)) is None or not w["healthy"]) and True, 30, every=0.1)
                detected = time.monotonic() - t0
                await asyncio.wait_for(asyncio.gather(*(s.task for s in streams)), 240)
                # New requests avoid it while it is down (it is unhealthy or restarting).
                fresh = [Stream(stub, request(i, 4)) for i in range(2)]
                await asyncio.wait_for(asyncio.gather(*(s.task for s in fresh)), 120)
            finally:
                try:
                    signal_group(pid, signal.SIGCONT)   # should the launcher not have killed it
                except ProcessLookupError:
                    pass
            return streams, fresh, victim, detected, view

    streams, fresh, victim, detected, _ = asyncio.run(scenario())
    # Goal 3 s; a loaded test box gets more room, but not a heartbeat timeout's worth times many.
    assert detected < 10, f"hung worker noticed only after {detected:.1f}s"
    for i, s in enumerate(streams):
        assert s.error is None, f"stream {i} failed: {s.error.code()} {s.error.details()}"
        assert (s.text, s.token_ids) == reference[i]
    for s in fresh:
        assert s.error is None and s.finished and s.worker != victim
    assert metric(h, "router", "switchyard_router_migrations_total", reason="worker_hung") >= 1
    # The batcher said why it went (exit code), and the pair came back.
    deadline = time.monotonic() + 240
    while True:
        u = state(h)["services"][victim]
        w = worker_view(h, victim)
        if u["state"] == "up" and u["restarts"] >= 1 and w is not None and w["healthy"]:
            break
        assert time.monotonic() < deadline, f"{victim} not back: {u} {w}\n{h.logs()}"
        time.sleep(0.5)
    assert u["last_exit_code"] == EXIT_WORKER_HUNG and u["last_exited"] == f"batcher-{victim}", u


def test_a_stopped_batcher_is_dropped_its_streams_move_and_it_lets_go(live):
    """SIGSTOP a batcher: the router drops it after worker_timeout_s without heartbeats, moves its
    streams (they complete as undisturbed) and cancels the request on it: resumed, the batcher stops
    generating for it at once instead of finishing it for nobody."""
    h = live
    from protos.switchyard.v1 import inference_pb2_grpc
    reference = asyncio.run(undisturbed(h.router, 2, MAX_TOKENS))
    before = metric(h, "router", "switchyard_router_migrations_total", reason="heartbeat")

    async def scenario():
        async with channel(h.router) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            streams = [Stream(stub, request(i, MAX_TOKENS)) for i in range(2)]
            await wait_until("both streams have tokens", lambda: all(len(s.got) >= 2 or s.error for s in streams), 120,
                             every=0.01)
            victim = streams[0].worker
            pid = state(h)["workers"][victim]["batcher_pid"]
            generated = metric(h, f"batcher-{victim}", "switchyard_generation_tokens_total")
            signal_group(pid, signal.SIGSTOP)
            t0 = time.monotonic()
            try:
                await wait_until("the router drops the silent batcher", lambda: worker_view(h, victim) is None, 30,
                                 every=0.1)
                detected = time.monotonic() - t0
                await asyncio.wait_for(asyncio.gather(*(s.task for s in streams)), 240)
            finally:
                signal_group(pid, signal.SIGCONT)
            return streams, victim, detected, generated

    streams, victim, detected, generated = asyncio.run(scenario())
    assert detected < 10, f"silent batcher dropped only after {detected:.1f}s"
    for i, s in enumerate(streams):
        assert s.error is None, f"stream {i} failed: {s.error.code()} {s.error.details()}"
        assert (s.text, s.token_ids) == reference[i]
    assert metric(h, "router", "switchyard_router_migrations_total", reason="heartbeat") > before
    # Resumed, it hears the cancel aimed at it and goes idle with the request's tokens mostly unmade.
    deadline = time.monotonic() + 60
    while True:
        w = worker_view(h, victim)
        if w is not None and w["healthy"] and w["num_running"] == 0 and w["num_waiting"] == 0:
            break
        assert time.monotonic() < deadline, f"{victim} not idle after SIGCONT: {w}"
        time.sleep(0.2)
    extra = metric(h, f"batcher-{victim}", "switchyard_generation_tokens_total") - generated
    assert extra < MAX_TOKENS // 2, f"the stopped batcher generated {extra} tokens for a stream that had moved"
    assert w["num_free_blocks"] == w["num_blocks"], w


def test_a_stalled_router_does_not_keep_a_batcher_busy(live):
    """The client's deadline passes while the router is stopped: the batcher ends the request itself."""
    h = live
    from protos.switchyard.v1 import inference_pb2_grpc
    router_pid = state(h)["pids"]["router"]
    before = {w: metric(h, f"batcher-{w}", "switchyard_rejections_total", reason="deadline") for w in ("w0", "w1")}

    async def scenario():
        async with channel(h.router) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            s = Stream(stub, request(0, 3000), timeout=4.0)   # far more tokens than 4 s allow on a CPU
            await wait_until("a token", lambda: s.got or s.error, 60)
            signal_group(router_pid, signal.SIGSTOP)
            await asyncio.wait_for(s.task, 30)
            return s, s.worker

    def dropped(wid: str) -> bool:
        return metric(h, f"batcher-{wid}", "switchyard_rejections_total", reason="deadline") > before[wid] \
            and metric(h, f"batcher-{wid}", "switchyard_requests_running") == 0

    try:
        s, wid = asyncio.run(scenario())
        assert s.error is not None and s.error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert not s.finished
        # Still stalled: no cancel can come from the router. The batcher lets go by itself.
        deadline = time.monotonic() + 20
        while not dropped(wid):
            assert time.monotonic() < deadline, (
                f"the batcher of {wid} kept the request after its deadline: deadline drops "
                f"{metric(h, f'batcher-{wid}', 'switchyard_rejections_total', reason='deadline')} "
                f"(before {before[wid]}), running {metric(h, f'batcher-{wid}', 'switchyard_requests_running')}")
            time.sleep(0.2)
    finally:
        signal_group(router_pid, signal.SIGCONT)
    w = h.worker_status_since(time.monotonic(), wid, until=lambda w: w["num_running"] == 0, timeout=30)
    assert w["num_free_blocks"] == w["num_blocks"], w
