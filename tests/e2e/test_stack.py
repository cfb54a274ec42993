"""One real stack (nats-server, kv_manager, router, batcher, worker) over loopback."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from protos.switchyard.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from tests.e2e.conftest import BASE_CONFIG, channel, collect, gen_request
from workers.engine.sampling_params import SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "The three primary colors are",
           "Water boils at"]


def test_stream_equals_in_process_engine_greedy(stack, engine):
    ref = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=12, temperature=0.0))[0]

    async def main():
        async with channel(stack.router) as ch:
            return await collect(inference_pb2_grpc.InferenceStub(ch), gen_request(PROMPTS[0], max_tokens=12))
    text, ids, resps = asyncio.run(main())
    assert ids == ref.token_ids
    assert text == ref.text
    assert len(resps) >= 2, "tokens must stream, not arrive in one message"
    last = resps[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == 12 and last.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert last.usage.worker_id == "w0" and resps[0].worker_id == "w0"


def test_fifty_concurrent_streams_complete_uninterleaved(stack, engine):
    refs = {p: o for p, o in zip(PROMPTS, engine.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0.0)))}

    async def main():
        async with channel(stack.router) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            reqs = [gen_request(PROMPTS[i % len(PROMPTS)], max_tokens=8, request_id=f"c50-{i}") for i in range(50)]
            return reqs, await asyncio.gather(*(collect(stub, r, timeout=180) for r in reqs))
    reqs, results = asyncio.run(main())
    assert len(results) == 50
    for req, (text, ids, resps) in zip(reqs, results):
        ref = refs[req.prompt]
        assert {r.request_id for r in resps} == {req.request_id}
        assert ids == ref.token_ids, f"{req.request_id}: {text!r} != {ref.text!r}"
        assert text == ref.text


def test_chat_and_list_models_and_tokenize(stack, engine):
    messages = [{"role": "user", "content": "Say hi"}]
    ref = engine.generate([engine.encode_prompt(messages)], SamplingParams(max_tokens=8, temperature=0.0))[0]

    async def main():
        async with channel(stack.router) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            models = await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=10)
            tok = await stub.Tokenize(inference_pb2.TokenizeRequest(model="smollm2-135m", prompt="Hello world"),
                                      timeout=10)
            req = gen_request("", max_tokens=8)
            for m in messages:
                req.messages.add(role=m["role"], content=m["content"])
            return models, tok, await collect(stub, req)
    models, tok, (text, ids, resps) = asyncio.run(main())
    assert [(m.name, m.num_workers, m.max_model_len) for m in models.models] == [("smollm2-135m", 1, 512)]
    assert list(tok.token_ids) == engine.loaded.tokenizer.encode("Hello world") and tok.count == len(tok.token_ids)
    # the chat template applied by the router, then the same greedy reply as the in-process engine
    assert resps[-1].usage.prompt_tokens == len(ref.prompt_token_ids)
    assert ids == ref.token_ids and text == ref.text and text.strip(), (text, ref.text)


def test_cancel_frees_the_request_and_its_blocks(stack):
    async def main():
        async with channel(stack.router) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            req = gen_request("Write a long story about a dragon. " * 8, max_tokens=400)
            req.sampling.ignore_eos = True   # still running when we look, however fast the engine
            call = stub.Generate(req, timeout=120)
            got = 0
            busy = None
            async for _ in call:
                got += 1
                if got == 2:
                    # Status comes from heartbeats (every 0.5 s): wait until one shows the request,
                    # with the stream still open (leaving the loop may already cancel the call).
                    deadline = time.monotonic() + 30.0
                    while True:
                        busy = stack.worker_status()
                        if busy["num_running"] + busy["num_waiting"] >= 1 or time.monotonic() > deadline:
                            break
                        await asyncio.sleep(0.1)
                    break
            call.cancel()
            return busy
    busy = asyncio.run(main())
    assert busy["num_running"] + busy["num_waiting"] >= 1 or busy["kv_usage"] > 0
    deadline = time.monotonic() + 60.0
    while True:
        w = stack.worker_status()
        if w["num_running"] == 0 and w["num_waiting"] == 0 and w["kv_usage"] == 0.0 \
                and w["num_free_blocks"] == w["num_blocks"]:
            break
        assert time.monotonic() < deadline, f"request still held after cancel: {w}"
        time.sleep(0.2)


def _code_and_details(coro_fn):
    async def main():
        async with channel(stack_router[0]) as ch:
            return await coro_fn(inference_pb2_grpc.InferenceStub(ch))
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        asyncio.run(main())
    return ei.value.code(), ei.value.details()


stack_router: list[str] = []


@pytest.fixture
def router(stack):
    stack_router[:] = [stack.router]
    return stack.router


@pytest.mark.parametrize("req,code,field", [
    (gen_request("hi", model="no-such-model"), grpc.StatusCode.NOT_FOUND, "smollm2-135m"),
    (gen_request(""), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (gen_request("hi", max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    (gen_request("hi", temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (gen_request("hello " * 600), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
])
def test_bad_requests_get_the_right_status_naming_the_field(router, req, code, field):
    got_code, details = _code_and_details(lambda stub: collect(stub, req, timeout=30))
    assert got_code == code, details
    assert field in details
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert details.startswith(field), details


def test_full_queue_is_resource_exhausted_fast_with_retry_after(stack):
    """More requests at once than running + waiting slots (16 + 64): the excess is refused at once -
    every refusal arrives before the queue has moved at all, i.e. before the first waiting request got
    a token (that needs a running one to finish its 32 tokens first)."""
    n, max_num_seqs = 150, BASE_CONFIG["max_num_seqs"]

    async def one(stub, i):
        req = gen_request(f"Tell me about number {i}", max_tokens=32)
        req.sampling.ignore_eos = True        # a running request holds its slot for all 32 steps
        call = stub.Generate(req, timeout=600)
        try:
            async for _ in call:
                return ("ok", time.monotonic(), None, call)
        except grpc.aio.AioRpcError as e:
            trailers = {k: v for k, v in (e.trailing_metadata() or ())}
            return (e.code(), time.monotonic(), trailers, call)

    async def main():
        async with channel(stack.router) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            results = await asyncio.wait_for(asyncio.gather(*(one(stub, i) for i in range(n))), 600)
            for *_, call in results:
                call.cancel()
            return results
    results = asyncio.run(main())
    rejected = [r for r in results if r[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
    first_tokens = sorted(r[1] for r in results if r[0] == "ok")
    assert rejected, "expected some RESOURCE_EXHAUSTED with 150 concurrent requests and 16+64 slots"
    assert all(r[0] in ("ok", grpc.StatusCode.RESOURCE_EXHAUSTED) for r in results), {r[0] for r in results}
    assert len(first_tokens) > max_num_seqs, "some accepted requests had to wait for a running slot"
    queue_moved = first_tokens[max_num_seqs]    # the first waiting request got its first token
    assert max(r[1] for r in rejected) < queue_moved, "rejections must not wait for the queue to move"
    assert all(int(r[2]["retry-after-ms"]) > 0 for r in rejected)
    # Everything cancelled: the batcher drains back to idle.
    deadline = time.monotonic() + 60
    while (w := stack.worker_status())["num_running"] + w["num_waiting"] > 0:
        assert time.monotonic() < deadline, w
        time.sleep(0.2)


def test_status_json_cli(stack, capsys):
    from services.cli import main
    assert main(["status", "--json", "--router", stack.router]) == 0
    import json
    st = json.loads(capsys.readouterr().out)
    assert st["workers"][0]["worker_id"] == "w0" and st["workers"][0]["healthy"] is True
    assert main(["status", "--router", stack.router]) == 0
    assert "w0" in capsys.readouterr().out


def test_generate_cli_streams(stack, capsys):
    from services.cli import main
    assert main(["generate", "The capital of France is", "--max-tokens", "4", "--router", stack.router]) == 0
    assert capsys.readouterr().out.strip()


def test_health_and_reflection_on_router(stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    with grpc.insecure_channel(stack.router) as ch:
        h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="switchyard.v1.Inference"))
        assert h.status == health_pb2.HealthCheckResponse.SERVING
        resp = next(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in resp.list_services_response.service}
        assert {"switchyard.v1.Inference", "grpc.health.v1.Health"} <= names
