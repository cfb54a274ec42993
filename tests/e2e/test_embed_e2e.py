"""Inference/Embed through a real stack: router -> NATS -> embedding batcher -> embedding worker.

One stack (a SmolLM2 generation worker w0 and an all-MiniLM-L6-v2 pair e0) for the module. The
vectors must equal our encoder run in process on the same texts; bad input gets the right code.
"""
from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from protos.switchyard.v1 import inference_pb2, inference_pb2_grpc
from tests.e2e.conftest import channel, collect, gen_request, start_stack

MODEL = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def embed_stack(tmp_path_factory):
    h = start_stack(tmp_path_factory.mktemp("embed"), workers=1, embedding_workers=1, embedding_batch_tokens=256,
                    embedding_max_texts=64)
    yield h
    leftovers = h.stop()
    assert not leftovers, f"processes outlived the stack stop: {leftovers}"


@pytest.fixture(scope="module")
def encoder():
    from workers.engine.embedding_loader import load_embedding_model
    return load_embedding_model(MODEL, num_threads=1)


def run(coro):
    return asyncio.run(coro)


async def _embed(router: str, texts, model: str = MODEL, **kw) -> inference_pb2.EmbedResponse:
    async with channel(router) as ch:
        return await inference_pb2_grpc.InferenceStub(ch).Embed(
            inference_pb2.EmbedRequest(model=model, texts=texts, **kw), timeout=120)


def _code(router: str, texts, model: str = MODEL) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        run(_embed(router, texts, model))
    return e.value.code(), e.value.details()


def test_embed_returns_the_encoders_vectors_in_order(embed_stack, encoder):
    texts = ["a cat sat on the mat", "hello", "switchyards route trains onto the right track " * 4]
    resp = run(_embed(embed_stack.router, texts))
    assert resp.model == MODEL and resp.worker_id == "e0"
    assert [d.index for d in resp.data] == [0, 1, 2]
    got = np.array([d.values for d in resp.data], dtype=np.float32)
    want = encoder.embed(encoder.tokenize(texts))
    assert got.shape == (3, 384)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert [d.tokens for d in resp.data] == [len(t) for t in encoder.tokenize(texts)]
    assert resp.prompt_tokens == sum(d.tokens for d in resp.data)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)   # the model's Normalize module


def test_requests_larger_than_one_forward_and_concurrent_ones_all_come_back_whole(embed_stack, encoder):
    # embedding_batch_tokens = 256 here: 40 texts of ~12 tokens need several forwards, and the
    # concurrent requests share forwards with each other.
    rng = np.random.default_rng(0)
    words = "red green blue train track switch signal yard engine car freight night".split()
    batches = [[" ".join(rng.choice(words, size=rng.integers(3, 15))) for _ in range(n)] for n in (40, 1, 7, 23)]

    async def all_at_once():
        return await asyncio.gather(*(_embed(embed_stack.router, b) for b in batches))
    for texts, resp in zip(batches, run(all_at_once())):
        got = np.array([d.values for d in resp.data], dtype=np.float32)
        np.testing.assert_allclose(got, encoder.embed(encoder.tokenize(texts)), atol=1e-5)


def test_list_models_shows_the_embedding_model(embed_stack):
    async def go():
        async with channel(embed_stack.router) as ch:
            return await inference_pb2_grpc.InferenceStub(ch).ListModels(inference_pb2.ListModelsRequest(), timeout=30)
    models = {m.name: m for m in run(go()).models}
    assert MODEL in models and models[MODEL].num_workers == 1 and models[MODEL].max_model_len == 256
    assert "smollm2-135m" in models


def test_bad_input_gets_the_right_code_and_a_clear_message(embed_stack):
    r = embed_stack.router
    code, msg = _code(r, [])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "at least one text" in msg
    code, msg = _code(r, ["x"] * 65)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "embedding_max_texts = 64" in msg
    code, msg = _code(r, ["fine", ""])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "texts[1]" in msg
    code, msg = _code(r, ["fine", "word " * 300])   # 302 tokens: over the model's 256, refused (not truncated)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "texts[1]: has 302 tokens" in msg and "256" in msg
    code, msg = _code(r, ["hi"], model="no-such-model")
    assert code == grpc.StatusCode.NOT_FOUND and MODEL in msg
    code, msg = _code(r, ["hi"], model="smollm2-135m")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "generation model" in msg


def test_the_hf_spelling_of_the_model_name_works(embed_stack):
    resp = run(_embed(embed_stack.router, ["hi"], model="sentence-transformers/all-MiniLM-L6-v2"))
    assert resp.model == MODEL and len(resp.data[0].values) == 384


def test_an_embedding_model_cannot_generate_and_generation_still_works(embed_stack):
    async def go(model):
        async with channel(embed_stack.router) as ch:
            return await collect(inference_pb2_grpc.InferenceStub(ch), gen_request("Hello", max_tokens=2, model=model))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        run(go(MODEL))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "embedding model" in e.value.details()
    text, ids, _ = run(go("smollm2-135m"))
    assert len(ids) == 2


def test_the_embedding_pair_is_a_supervised_unit_in_stack_json(embed_stack):
    state = embed_stack.state
    assert "e0" in state["services"] and state["services"]["e0"]["state"] == "up"
    assert set(state["services"]["e0"]["pids"]) == {"worker-e0", "batcher-e0"}
    assert state["embedding_workers"]["e0"]["model"] == MODEL


def test_a_caller_that_gives_up_cancels_and_the_worker_keeps_serving(embed_stack, encoder):
    texts = [f"text number {i} about freight trains in the night" for i in range(64)]   # many forwards of 256 tokens
    with pytest.raises(grpc.aio.AioRpcError) as e:
        async def impatient():
            async with channel(embed_stack.router) as ch:
                await inference_pb2_grpc.InferenceStub(ch).Embed(
                    inference_pb2.EmbedRequest(model=MODEL, texts=texts), timeout=0.05)
        run(impatient())
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    resp = run(_embed(embed_stack.router, ["still here"]))
    np.testing.assert_allclose(np.array(resp.data[0].values, dtype=np.float32),
                               encoder.embed(encoder.tokenize(["still here"]))[0], atol=1e-5)


def test_the_embedding_batcher_exports_its_metrics(embed_stack):
    import urllib.request
    run(_embed(embed_stack.router, ["count me", "and me"]))
    addr = embed_stack.state["metrics"]["batcher-e0"]
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=10).read().decode()
    lines = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in text.splitlines()
             if ln.startswith(("switchyard_embed_texts_total", "switchyard_embed_requests_total"))}
    texts = next(v for k, v in lines.items() if k.startswith("switchyard_embed_texts_total"))
    requests = next(v for k, v in lines.items() if k.startswith("switchyard_embed_requests_total"))
    assert texts >= 2 and requests >= 1
