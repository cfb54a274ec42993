"""Which model an Embed request may use (router/embeddings.py), decided from real heartbeats in the
router's replica table: unknown, generation, embedding with and without a healthy worker."""
from __future__ import annotations

import grpc
import pytest

from common.config import StackConfig
from protos.switchyard.v1 import bus_pb2
from router.embeddings import check_texts, resolve_embedding_model
from router.service import Router
from router.validation import RequestError

MINILM = "all-minilm-l6-v2"


@pytest.fixture
def router():
    r = Router(StackConfig(), nc=None, kv_channel=None)
    r.table.observe(bus_pb2.Heartbeat(worker_id="w0", model="smollm2-135m", healthy=True, max_model_len=2048))
    yield r
    r._tokenize_pool.shutdown(wait=False)


def embedding_worker(r, healthy: bool = True):
    r.table.observe(bus_pb2.Heartbeat(worker_id="e0", model=MINILM, healthy=healthy, model_kind="embedding",
                                      max_model_len=256))


def code_of(fn, *args) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(RequestError) as e:
        fn(*args)
    return e.value.code, e.value.message


def test_the_served_embedding_model_by_any_spelling(router):
    embedding_worker(router)
    for name in (MINILM, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", ""):
        assert resolve_embedding_model(router, name) == MINILM


def test_a_generation_model_cannot_embed(router):
    embedding_worker(router)
    code, msg = code_of(resolve_embedding_model, router, "smollm2-135m")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "generation model" in msg and MINILM in msg


def test_an_unknown_model_is_not_found_and_says_how_to_get_one(router):
    code, msg = code_of(resolve_embedding_model, router, "text-embedding-3-small")
    assert code == grpc.StatusCode.NOT_FOUND and "--embedding-workers 1" in msg
    code, _ = code_of(resolve_embedding_model, router, "")    # none configured to run
    assert code == grpc.StatusCode.NOT_FOUND


def test_an_embedding_model_whose_worker_is_unhealthy_is_unavailable(router):
    embedding_worker(router, healthy=False)
    code, msg = code_of(resolve_embedding_model, router, MINILM)
    assert code == grpc.StatusCode.UNAVAILABLE and "retry" in msg


def test_text_checks_before_tokenizing():
    cfg = StackConfig(embedding_max_texts=3)
    assert code_of(check_texts, [], cfg, 256)[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "embedding_max_texts = 3" in code_of(check_texts, ["a"] * 4, cfg, 256)[1]
    assert "texts[1]" in code_of(check_texts, ["a", ""], cfg, 256)[1]
    assert "texts[0]" in code_of(check_texts, ["x" * (256 * cfg.prompt_chars_per_token + 1)], cfg, 256)[1]
    check_texts(["fine", "also fine"], cfg, 256)
