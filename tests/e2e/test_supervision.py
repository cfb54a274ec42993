"""Supervision with real processes: `switchyard up` restarts what dies (issue 16 item 1).

One 1-worker stack on the random tiny model (fast to start), then in order: SIGKILL the worker (the
pair restarts), SIGKILL the batcher (its worker goes too, the pair restarts), SIGKILL nats-server (it
restarts; the other services reconnect without restarting). Each ends with a Generate that succeeds.
Every wait polls a condition under a generous deadline.
"""
from __future__ import annotations

import json
import os
import signal
import time

import grpc
import pytest

from tests.e2e.conftest import gen_request, pid_alive, start_stack

MODEL = "random:tiny"


@pytest.fixture(scope="module")
def sup_stack(tmp_path_factory):
    h = start_stack(tmp_path_factory.mktemp("supervised"), workers=1, model=MODEL)
    yield h
    leftovers = h.stop()
    assert not leftovers, f"processes outlived the stack stop: {leftovers}"


def read_state(h) -> dict:
    return json.loads((h.workdir / "stack.json").read_text())


def wait_for(what: str, cond, h, timeout: float = 60.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = cond()
        except (OSError, ValueError, KeyError, grpc.RpcError):
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout}s\n{h.logs()}")
        time.sleep(every)


def generate_ok(h) -> bool:
    from protos.switchyard.v1 import inference_pb2_grpc
    with grpc.insecure_channel(h.router) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        resps = list(stub.Generate(gen_request("hello there", max_tokens=4, model=MODEL), timeout=10))
    return bool(resps) and resps[-1].finish_reason != ""


def unit(h, name: str) -> dict:
    return read_state(h)["services"][name]


def restarted(h, name: str, restarts: int) -> dict | None:
    u = unit(h, name)
    return u if u["state"] == "up" and u["restarts"] >= restarts else None


def test_killed_worker_restarts_the_pair(sup_stack):
    h = sup_stack
    assert wait_for("first generate", lambda: generate_ok(h), h)
    before = read_state(h)
    old_worker, old_batcher = before["workers"]["w0"]["worker_pid"], before["workers"]["w0"]["batcher_pid"]
    os.killpg(old_worker, signal.SIGKILL)
    u = wait_for("w0 pair restarted", lambda: restarted(h, "w0", 1), h)
    assert u["last_exit_code"] == -signal.SIGKILL and u["last_exited"] == "worker-w0"
    assert not pid_alive(old_batcher), "the batcher of a dead worker must go too"
    now = read_state(h)["workers"]["w0"]
    assert now["worker_pid"] != old_worker and now["batcher_pid"] != old_batcher
    assert wait_for("generate after the worker restart", lambda: generate_ok(h), h)


def test_killed_batcher_takes_its_worker_and_the_pair_comes_back(sup_stack):
    h = sup_stack
    before = read_state(h)
    restarts = before["services"]["w0"]["restarts"]
    old_worker, old_batcher = before["workers"]["w0"]["worker_pid"], before["workers"]["w0"]["batcher_pid"]
    os.killpg(old_batcher, signal.SIGKILL)
    wait_for("the worker of a dead batcher stopped", lambda: not pid_alive(old_worker), h, timeout=20)
    u = wait_for("w0 pair restarted", lambda: restarted(h, "w0", restarts + 1), h)
    assert u["last_exit_code"] == -signal.SIGKILL and u["last_exited"] == "batcher-w0"
    assert wait_for("generate after the batcher restart", lambda: generate_ok(h), h)


def test_killed_nats_restarts_and_services_reconnect(sup_stack):
    h = sup_stack
    before = read_state(h)
    others = {n: p for n, p in before["pids"].items() if n != "nats"}
    os.killpg(before["pids"]["nats"], signal.SIGKILL)
    u = wait_for("nats restarted", lambda: restarted(h, "nats", 1), h)
    assert u["last_exit_code"] == -signal.SIGKILL
    assert wait_for("generate after the nats restart", lambda: generate_ok(h), h)
    after = read_state(h)
    assert {n: p for n, p in after["pids"].items() if n != "nats"} == others, "nothing else restarted"
    assert all(u["restarts"] == 0 for n, u in after["services"].items() if n not in ("nats", "w0"))
    # One warning per disconnect and reconnect, no traceback.
    for name in ("router", "kv_manager", "batcher-w0"):
        log = (h.workdir / "logs" / f"{name}.log").read_text(errors="replace")
        assert "NATS connection lost" in log and "Traceback" not in log, f"{name}.log:\n{log[-3000:]}"


def test_status_shows_restarts_and_exit_codes(sup_stack, capsys):
    from services.cli import main
    st = sup_stack.status()
    assert st["services"]["w0"]["restarts"] == 2 and st["services"]["nats"]["restarts"] == 1
    assert st["services"]["nats"]["last_exit_code"] == -9 and st["services"]["router"]["restarts"] == 0
    assert main(["status", "--router", sup_stack.router]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("nats "))
    assert line.split()[1:4] == ["up", "1", "-9"], line
