"""Fuzzing the router's third front door, `switchyard.v1.Batch` (bulk jobs): every RPC gets generated
messages (items whose bodies are JSON or not, JSONL bytes, odd ids and limits), mutated bytes and
garbage. The same property as the other front doors: never UNKNOWN or INTERNAL, a one-line message,
an answer within the timeout, no process of the stack dies. Valid items ask for at most 2 tokens."""
from __future__ import annotations

import grpc
import pytest
from hypothesis import example, given, strategies as st

from tests.e2e.conftest import pid_alive
from tests.fuzz.wire import call, check_answer, fuzz_settings, messages, statuses, wire

MODEL = "smollm2-135m"
BODIES = ['{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}',
          '{"prompt": "Hello", "max_tokens": 2}', "{}", "not json", "[1]", '{"max_tokens": -5}',
          '{"messages": "x", "max_tokens": 1}', '{"model": "nope", "prompt": "a", "max_tokens": 1}']


def _mostly(valid: list, wild: st.SearchStrategy) -> st.SearchStrategy:
    return st.integers(0, 4).flatmap(lambda i: st.sampled_from(valid) if i else wild)


def _rpcs():
    from protos.switchyard.v1 import batch_pb2
    item = messages(batch_pb2.BatchItem.DESCRIPTOR, dict(
        custom_id=_mostly(["a", "b"], st.text(max_size=10)),
        url=_mostly(["", "/v1/completions", "/v1/chat/completions"], st.text(max_size=12)),
        body_json=_mostly(BODIES, st.text(max_size=30))))
    jsonl = _mostly([b""], st.lists(st.sampled_from(BODIES), max_size=3).map(lambda xs: "\n".join(
        f'{{"custom_id": "l{i}", "method": "POST", "url": "/v1/completions", "body": {b}}}'
        for i, b in enumerate(xs)).encode()))
    create = dict(items=st.lists(item, max_size=3), jsonl=jsonl, model=_mostly([MODEL], st.text(max_size=8)))
    job_id = dict(job_id=_mostly(["", "nope"], st.text(max_size=20)))
    # ListJobs first: every listing reads every job record (router/batch_jobs.py list_jobs), and
    # CreateJob's fuzzing leaves about half its messages as jobs: at 10,000 examples a listing of
    # ~5,000 jobs took ~1 s, and the 10,000 listings hours. It lists jobs of its own instead.
    listing = dict(limit=_mostly([0, 1, 5, 100], st.integers(0, 2**32 - 1)))
    return [("ListJobs", batch_pb2.BatchListJobsRequest, listing, "unary"),
            ("CreateJob", batch_pb2.BatchCreateJobRequest, create, "unary"),
            ("GetJob", batch_pb2.BatchGetJobRequest, job_id, "unary"),
            ("CancelJob", batch_pb2.BatchCancelJobRequest, job_id, "unary"),
            ("GetResults", batch_pb2.BatchGetResultsRequest, job_id, "server_stream")]


RPCS = _rpcs()


@pytest.mark.parametrize("method,cls,hints,kind", RPCS, ids=[r[0] for r in RPCS])
def test_batch_rpc_answers_every_generated_message(fuzz_stack, method, cls, hints, kind):
    from common.rpc import options
    path = f"/switchyard.v1.Batch/{method}"
    seen = statuses(path)
    with grpc.insecure_channel(fuzz_stack.router, options=options()) as ch:
        if method == "ListJobs":   # something to list and page through (limit 1 and 5: has_more)
            from protos.switchyard.v1 import batch_pb2
            job = batch_pb2.BatchCreateJobRequest(model=MODEL, items=[batch_pb2.BatchItem(
                custom_id="a", url="/v1/completions", body_json=BODIES[1])]).SerializeToString()
            for _ in range(12):
                created = call(ch, "/switchyard.v1.Batch/CreateJob", job)
                assert created.code == grpc.StatusCode.OK, created

        @fuzz_settings()
        @given(data=wire(messages(cls.DESCRIPTOR, hints)))
        @example(data=b"\xff\xff\xff\xff garbage")
        def answers(data):
            check_answer(call(ch, path, data, kind), data, seen)
        answers()
    print(method, "statuses:", seen)
    dead = [p for p in fuzz_stack.all_pids() if not pid_alive(p)]
    assert not dead, f"stack processes died: {dead}\n{fuzz_stack.logs()}"


def test_listing_jobs_leaves_no_consumer_behind(fuzz_stack):
    """nats-py's kv.keys() left a consumer per listing on the server for minutes: the 10,000-message
    fuzz run hit the stream's consumer limit and ListJobs answered UNKNOWN. Listings now delete theirs."""
    import asyncio

    import nats

    from common import subjects
    from protos.switchyard.v1 import batch_pb2, batch_pb2_grpc
    from tests.e2e.conftest import channel

    async def main() -> int:
        async with channel(fuzz_stack.router) as ch:
            stub = batch_pb2_grpc.BatchStub(ch)
            for _ in range(40):
                await stub.ListJobs(batch_pb2.BatchListJobsRequest(limit=1), timeout=30)
        nc = await nats.connect(fuzz_stack.state["nats"])
        try:
            info = await nc.jetstream().stream_info(f"KV_{subjects.BATCH_JOBS_BUCKET}")
            return info.state.consumer_count
        finally:
            await nc.close()
    assert asyncio.run(main()) <= 2   # at most a listing of another test still in flight
