"""LoRA adapters loaded and unloaded at run time (Admin/LoadAdapter, UnloadAdapter, Inference/ListAdapters)
on a real stack: router -> NATS -> batcher -> worker, one worker, no configured adapters."""
from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest

from bench.lora_bench import write_peft_adapter
from protos.switchyard.v1 import (
    inference_pb2,
    inference_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from tests.e2e.conftest import channel, collect, gen_request, start_stack

PROMPT = "The capital of France is"
TOKEN = "admin-secret"
ADMIN = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="module")
def admin_stack(tmp_path_factory):
    from workers.engine.loader import model_config_from_hf, smollm2_dir
    mc = model_config_from_hf(json.loads((smollm2_dir() / "config.json").read_text()))
    root = tmp_path_factory.mktemp("lora_admin")
    paths = {
        "ad1": write_peft_adapter(root / "ad1", mc, r=8, alpha=16, targets=["q_proj", "v_proj", "down_proj"],
                                  seed=11, std=0.05),
        "drain": write_peft_adapter(root / "drain", mc, r=4, alpha=8, targets=["q_proj", "o_proj"], seed=5, std=0.05),
        "big_rank": write_peft_adapter(root / "big_rank", mc, r=32, alpha=32, targets=["q_proj"], seed=1),
    }
    bad_target = write_peft_adapter(root / "bad_target", mc, r=4, alpha=8, targets=["q_proj"], seed=2)
    cfg = json.loads((bad_target / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "lm_head"]
    (bad_target / "adapter_config.json").write_text(json.dumps(cfg))
    paths["bad_target"] = bad_target
    h = start_stack(root / "stack", workers=1, max_loras=2, max_lora_rank=16, admin_tokens=[TOKEN])
    yield h, {k: str(v) for k, v in paths.items()}
    leftovers = h.stop()
    assert not leftovers, f"processes outlived the stack stop: {leftovers}"


async def load(ch, name: str, path: str, md=ADMIN, **kw) -> inference_pb2.LoadAdapterResponse:
    return await inference_pb2_grpc.AdminStub(ch).LoadAdapter(
        inference_pb2.LoadAdapterRequest(name=name, path=path, **kw), metadata=md, timeout=60)


async def error_of(coro) -> tuple[grpc.StatusCode | None, str]:
    try:
        await coro
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details()
    return None, ""


async def worker_adapters(h) -> list[str]:
    port = h.state["workers"]["w0"]["port"]
    async with channel(f"127.0.0.1:{port}") as ch:
        info = await worker_pb2_grpc.WorkerStub(ch).Health(worker_pb2.HealthRequest(), timeout=5)
    return list(info.adapters)


def test_loaded_adapter_serves_like_the_in_process_engine(admin_stack):
    from batcher.engine import Engine
    from workers.engine.sampling_params import SamplingParams
    h, paths = admin_stack

    async def main():
        async with channel(h.router) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            resp = await load(ch, "ad1", paths["ad1"], capabilities=["geo"])
            by_id = await collect(stub, gen_request(PROMPT, max_tokens=8, adapter_id="ad1"))
            by_model = await collect(stub, gen_request(PROMPT, max_tokens=8, model="ad1"))
            listed = await stub.ListAdapters(inference_pb2.ListAdaptersRequest(), timeout=5)
            again = await load(ch, "ad1", paths["ad1"])   # same name and path: idempotent
            return resp, by_id, by_model, listed, again
    resp, (text, ids, _), (_, ids_by_model, _), listed, again = asyncio.run(main())
    assert list(resp.workers) == ["w0"] and resp.host_mb > 0 and resp.adapter.base_model == "smollm2-135m"
    assert list(again.workers) == ["w0"]

    eng = Engine.from_model("smollm2-135m", num_kv_blocks=64, max_model_len=512, lora_adapters={"ad1": paths["ad1"]})
    sp = SamplingParams(max_tokens=8, temperature=0.0)
    want = eng.generate(PROMPT, sp, adapter_ids=["ad1"])[0]
    assert want.token_ids != eng.generate(PROMPT, sp)[0].token_ids, "the adapter must change the output"
    assert ids == want.token_ids and text == want.text
    assert ids_by_model == want.token_ids

    [info] = [a for a in listed.adapters if a.name == "ad1"]
    assert (info.base_model, info.path, info.origin, list(info.workers), list(info.capabilities)) == \
        ("smollm2-135m", paths["ad1"], "admin", ["w0"], ["geo"])


@pytest.mark.parametrize("which, reason", [("big_rank", "max_lora_rank"), ("bad_target", "lm_head"),
                                           ("missing", "not a folder")])
def test_bad_adapter_is_invalid_argument_with_the_reason(admin_stack, which, reason):
    h, paths = admin_stack
    path = paths.get(which, "/nonexistent/adapter")

    async def main():
        async with channel(h.router) as ch:
            err = await error_of(load(ch, which, path))
            listed = await inference_pb2_grpc.InferenceStub(ch).ListAdapters(inference_pb2.ListAdaptersRequest(),
                                                                             timeout=5)
            _, ids, _ = await collect(inference_pb2_grpc.InferenceStub(ch), gen_request(PROMPT, max_tokens=2))
            return err, listed, ids
    (code, msg), listed, ids = asyncio.run(main())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and reason in msg, msg
    assert which not in [a.name for a in listed.adapters]
    assert len(ids) == 2   # the stack still serves
    assert which not in asyncio.run(worker_adapters(h))


def test_admin_calls_need_the_admin_token(admin_stack):
    h, paths = admin_stack

    async def main():
        async with channel(h.router) as ch:
            admin = inference_pb2_grpc.AdminStub(ch)
            return [await error_of(load(ch, "x", paths["ad1"], md=())),
                    await error_of(load(ch, "x", paths["ad1"], md=(("authorization", "Bearer wrong"),))),
                    await error_of(admin.UnloadAdapter(inference_pb2.UnloadAdapterRequest(name="ad1"), timeout=5))]
    for code, _ in asyncio.run(main()):
        assert code == grpc.StatusCode.UNAUTHENTICATED


def test_unload_unknown_adapter_is_not_found(admin_stack):
    h, _ = admin_stack

    async def main():
        async with channel(h.router) as ch:
            return await error_of(inference_pb2_grpc.AdminStub(ch).UnloadAdapter(
                inference_pb2.UnloadAdapterRequest(name="never-loaded"), metadata=ADMIN, timeout=10))
    code, msg = asyncio.run(main())
    assert code == grpc.StatusCode.NOT_FOUND and "never-loaded" in msg


def test_unload_lets_a_streaming_request_finish_and_refuses_new_ones(admin_stack):
    h, paths = admin_stack
    n = 128

    async def main():
        async with channel(h.router) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            await load(ch, "drain", paths["drain"])
            long_req = gen_request(PROMPT, max_tokens=n, adapter_id="drain")
            long_req.sampling.ignore_eos = True
            first = asyncio.Event()
            got: list[int] = []
            finish = None

            async def stream():
                nonlocal finish
                async for r in stub.Generate(long_req, timeout=120):
                    got.extend(r.token_ids)
                    first.set()
                    if r.finish_reason:
                        finish = (r.finish_reason, time.monotonic())
            streaming = asyncio.ensure_future(stream())
            await asyncio.wait_for(first.wait(), 60)
            unload = asyncio.ensure_future(inference_pb2_grpc.AdminStub(ch).UnloadAdapter(
                inference_pb2.UnloadAdapterRequest(name="drain"), metadata=ADMIN, timeout=120))
            # The unload has begun once the router's registry and the batcher's heartbeat both dropped it.
            deadline = time.monotonic() + 60
            while any(a.name == "drain" for a in (await stub.ListAdapters(inference_pb2.ListAdaptersRequest(),
                                                                          timeout=10)).adapters):
                assert time.monotonic() < deadline and not unload.done(), "the unload never began"
                await asyncio.sleep(0.05)
            still_streaming = not streaming.done()
            during = await error_of(collect(stub, gen_request(PROMPT, max_tokens=2, adapter_id="drain")))
            resp = await unload
            tokens_at_unload = len(got)
            await streaming
            after = await error_of(collect(stub, gen_request(PROMPT, max_tokens=2, adapter_id="drain")))
            return got, finish, tokens_at_unload, resp, during, after, still_streaming
    got, finish, tokens_at_unload, resp, during, after, still_streaming = asyncio.run(main())
    assert still_streaming, "the accepted stream ended before the unload began: nothing ran 'during' it"
    assert len(got) == n and finish is not None and finish[0] == 2   # FINISH_REASON_LENGTH: streamed in full
    # The unload answers only after the accepted request is done: by then the client holds (nearly) all
    # of its tokens; an unload that did not wait answers a few tokens after it began, right after the first.
    assert tokens_at_unload >= n // 2, f"the unload answered after {tokens_at_unload} of {n} tokens"
    assert list(resp.workers) == ["w0"], resp.message
    assert during[0] == grpc.StatusCode.NOT_FOUND and "drain" in during[1]
    assert after[0] == grpc.StatusCode.NOT_FOUND and "drain" in after[1]
    assert "drain" not in asyncio.run(worker_adapters(h))


def test_cli_load_list_unload(admin_stack, capsys, monkeypatch):
    from services.cli import main
    monkeypatch.delenv("SWITCHYARD_ADMIN_TOKEN", raising=False)
    h, paths = admin_stack
    r = ["--router", h.router]
    assert main(["admin", "load-adapter", "cli-ad", paths["ad1"], "--capability", "geo", "--token", TOKEN, *r]) == 0
    assert "served by w0" in capsys.readouterr().out
    assert main(["adapters", "--json", *r]) == 0
    [listed] = [a for a in json.loads(capsys.readouterr().out) if a["name"] == "cli-ad"]
    assert listed["workers"] == ["w0"] and listed["capabilities"] == ["geo"]
    assert main(["admin", "unload-adapter", "cli-ad", *r]) == 1   # no token
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main(["admin", "unload-adapter", "cli-ad", "--token", TOKEN, *r]) == 0
    assert "unloaded from w0" in capsys.readouterr().out
    assert main(["adapters", *r]) == 0
    assert "cli-ad" not in capsys.readouterr().out
