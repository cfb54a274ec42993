"""A durable bulk job (router/batch_jobs.py, batch_runner.py) survives SIGKILL of a worker, of a batcher and
of nats-server mid-job (the launcher restarts each; JetStream keeps items, results and the job on disk):
every custom_id ends in the results exactly once."""
from __future__ import annotations

import json
import os
import signal
import time

import grpc
import pytest

from tests.e2e.conftest import start_stack

ITEMS = 240


def jsonl(n: int) -> bytes:
    return "\n".join(json.dumps({"custom_id": f"item-{i:04d}", "method": "POST", "url": "/v1/completions",
                                 "body": {"model": "smollm2-135m", "prompt": f"Item {i}:", "max_tokens": 1 + i % 2}})
                     for i in range(n)).encode()


@pytest.fixture
def durable_stack(tmp_path):
    # batch_concurrency 2: the job lasts long enough on a fast box for three kills mid-job.
    h = start_stack(tmp_path / "stack", workers=1, batch_ack_wait_s=4.0, batch_item_timeout_s=20.0,
                    batch_concurrency=2, batch_max_deliver=6)
    yield h
    leftovers = h.stop()
    assert not leftovers, f"processes outlived the stack stop: {leftovers}"


def state(h) -> dict:
    return json.loads((h.workdir / "stack.json").read_text())


def test_job_survives_sigkill_of_worker_batcher_and_nats(durable_stack):
    from common.rpc import sync_channel
    from protos.switchyard.v1 import batch_pb2, batch_pb2_grpc
    h = durable_stack
    with sync_channel(h.router) as ch:
        stub = batch_pb2_grpc.BatchStub(ch)
        job = stub.CreateJob(batch_pb2.BatchCreateJobRequest(jsonl=jsonl(ITEMS), endpoint="/v1/completions"),
                             timeout=60)
        assert job.counts.total == ITEMS and not job.input_errors

        def get():
            while True:   # the router's JetStream calls fail while nats-server is down: ask again
                try:
                    return stub.GetJob(batch_pb2.BatchGetJobRequest(job_id=job.id), timeout=10)
                except grpc.RpcError:
                    time.sleep(0.5)

        def done(j) -> int:
            return j.counts.completed + j.counts.failed + j.counts.cancelled

        kills = [("worker", lambda s: s["workers"]["w0"]["worker_pid"]),
                 ("batcher", lambda s: s["workers"]["w0"]["batcher_pid"]),
                 ("nats", lambda s: s["pids"]["nats"])]
        deadline = time.monotonic() + 600
        killed = []
        for i, (what, pid_of) in enumerate(kills):
            at = ITEMS * (i + 1) // (len(kills) + 2)   # after 20%, 40%, 60% of the items
            j = get()
            while done(j) < at:
                assert j.status == "in_progress" and time.monotonic() < deadline, (j, killed)
                time.sleep(0.2)
                j = get()
            s = state(h)
            assert all(u["state"] == "up" for u in s["services"].values()), s["services"]
            os.kill(pid_of(s), signal.SIGKILL)
            killed.append((what, done(j)))
            # the next kill only once the launcher has restarted it
            while not (all(u["state"] == "up" for u in state(h)["services"].values())
                       and state(h)["services"][{"worker": "w0", "batcher": "w0", "nats": "nats"}[what]]["restarts"]):
                assert time.monotonic() < deadline, state(h)["services"]
                time.sleep(0.5)
        j = get()
        while j.status != "completed":
            assert time.monotonic() < deadline and j.status == "in_progress", j
            time.sleep(0.5)
            j = get()
        assert all(d < ITEMS for _, d in killed), f"a kill came after the job ended: {killed}"
        lines = [json.loads(x) for c in stub.GetResults(batch_pb2.BatchGetResultsRequest(job_id=job.id), timeout=60)
                 for x in c.lines]
    ids = [r["custom_id"] for r in lines]
    assert len(ids) == ITEMS and set(ids) == {f"item-{i:04d}" for i in range(ITEMS)}   # each exactly once
    failed = [r for r in lines if r["error"] is not None]
    assert not failed, failed[:3]   # retries with backoff outlast the restarts: every item got its answer
    assert j.counts.completed == ITEMS and j.counts.pending == 0
    restarts = {n: u["restarts"] for n, u in state(h)["services"].items()}
    assert restarts["w0"] >= 2 and restarts["nats"] >= 1, restarts
