"""Fuzzing the router's third front door, `switchyard.v1.Batch` (bulk jobs): every RPC gets generated
messages (items whose bodies are JSON or not, JSONL bytes, odd ids and limits), mutated bytes and
garbage. The same property as the other front doors: never UNKNOWN or INTERNAL, a one-line message,
an answer within the timeout, no process of the stack dies. Valid items ask for at most 2 tokens."""
from __future__ import annotations

import grpc
import pytest
from hypothesis import example, given, strategies as st

from tests.e2e.conftest import pid_alive
from tests.fuzz.wire import call, check_answer, fuzz_settings, messages, wire

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
    return [("CreateJob", batch_pb2.BatchCreateJobRequest, create, "unary"),
            ("GetJob", batch_pb2.BatchGetJobRequest, job_id, "unary"),
            ("ListJobs", batch_pb2.BatchListJobsRequest, {}, "unary"),
            ("CancelJob", batch_pb2.BatchCancelJobRequest, job_id, "unary"),
            ("GetResults", batch_pb2.BatchGetResultsRequest, job_id, "server_stream")]


RPCS = _rpcs()


@pytest.mark.parametrize("method,cls,hints,kind", RPCS, ids=[r[0] for r in RPCS])
def test_batch_rpc_answers_every_generated_message(fuzz_stack, method, cls, hints, kind):
    from common.rpc import options
    seen: dict[str, int] = {}
    path = f"/switchyard.v1.Batch/{method}"
    with grpc.insecure_channel(fuzz_stack.router, options=options()) as ch:
        @fuzz_settings()
        @given(data=wire(messages(cls.DESCRIPTOR, hints)))
        @example(data=b"\xff\xff\xff\xff garbage")
        def answers(data):
            check_answer(call(ch, path, data, kind), data, seen)
        answers()
    print(method, "statuses:", seen)
    dead = [p for p in fuzz_stack.all_pids() if not pid_alive(p)]
    assert not dead, f"stack processes died: {dead}\n{fuzz_stack.logs()}"
