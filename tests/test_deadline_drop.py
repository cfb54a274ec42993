"""A request still queued at its deadline is dropped by the engine batcher (batcher/service.py with
batcher/scheduler.py): an error chunk CHUNK_ERROR_DEADLINE, which the router answers with
DEADLINE_EXCEEDED, and nothing of it is kept. In-memory NATS and a worker whose steps the test ends
(the harness of tests/test_nats_edge.py)."""
from __future__ import annotations

import asyncio
import time

import grpc

from common import subjects
from protos.switchyard.v1 import bus_pb2
from router.validation import CHUNK_ERROR_STATUS
from tests.test_nats_edge import FakeNats, W, engine_batcher, request


def test_a_request_queued_past_its_deadline_is_dropped_with_deadline_exceeded():
    async def main():
        nc = FakeNats()
        b, worker = await engine_batcher(nc)          # 4 seats
        for i in range(4):
            await nc.deliver(subjects.request(W), request(f"r{i}"))
        step = await worker.step_sent()                # all four seated and at the worker
        deadline = int(time.time() * 1000) + 200
        await nc.deliver(subjects.request(W), request("late", deadline_unix_ms=deadline))
        assert "late" in b.edge.streams and b.core.scheduler.num_waiting == 1
        await asyncio.sleep(0.3)                       # the deadline passes while it waits for a seat
        worker.finish_step(step)
        await worker.step_sent()                       # the loop went round: expired requests were dropped
        [chunk] = nc.chunks("late")
        assert chunk.error == bus_pb2.CHUNK_ERROR_DEADLINE and chunk.error_reason == "deadline"
        assert CHUNK_ERROR_STATUS[chunk.error] == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "late" not in b.edge.streams and "late" not in b.core.scheduler.requests
        assert b.core.scheduler.num_waiting == 0 and b.core.stats().num_deadline_drops == 1
        assert all(not nc.chunks(f"r{i}")[0].error for i in range(4))   # the running ones go on
        await b.stop()
    asyncio.run(main())
