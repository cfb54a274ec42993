"""Inference/Embed: validate, tokenize, route to an embedding batcher, return the vectors.

    texts -> checks (count, empty, characters) -> the model's tokenizer (router thread pool) ->
    per-text token limit -> the least-loaded healthy worker whose heartbeat says model_kind
    "embedding" -> one BatchRequest (embed=true) on sy.req.<worker> -> one TokenChunk back on
    sy.tok.<request_id> with every vector -> EmbedResponse.

Errors, as OpenAI answers them: no texts, too many, an empty text or one over the model's token
limit (never truncated) are INVALID_ARGUMENT naming the text; a model nobody serves is NOT_FOUND; a
generation model asked to embed is INVALID_ARGUMENT (and an embedding model asked to generate is
refused by its batcher the same way); an embedding model with no healthy worker is UNAVAILABLE.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc
import nats.errors
import numpy as np

from common import subjects
from protos.switchyard.v1 import bus_pb2, inference_pb2
from router.validation import CHUNK_ERROR_STATUS, RequestError, invalid
from workers.engine.embedding_loader import EMBEDDING_KIND, canonical_name, load_embedding_tokenizer

log = logging.getLogger("switchyard.router.embeddings")

WORKER_CHECK_S = 1.0    # while waiting for the answer: how often to check the worker is still there
VECTOR_BYTES = 384 * 4 + 16   # one all-MiniLM-L6-v2 vector in the answer chunk (float32), with some room


def embedding_views(router, model: str) -> list:
    """Routable replicas of `model` that are embedding workers."""
    return [w for w in router.table.routable(model) if w.heartbeat.model_kind == EMBEDDING_KIND]


def embedding_models(router) -> list[str]:
    return sorted({w.model for w in router.table.workers.values() if w.heartbeat.model_kind == EMBEDDING_KIND})


def resolve_embedding_model(router, requested: str) -> str:
    """The served embedding model a request names ("" = the configured one); NOT_FOUND / INVALID_ARGUMENT
    / UNAVAILABLE with what the caller can use instead."""
    name = requested or router.cfg.embedding_model
    served = embedding_models(router)
    if not name:
        raise invalid("model", "set model (an embedding model: " + (", ".join(served) or "none served") + ")")
    canon = canonical_name(name) or name
    for m in (name, canon):
        if m in served:
            if not embedding_views(router, m):
                raise RequestError(grpc.StatusCode.UNAVAILABLE, f"no healthy worker serves embedding model {m!r} "
                                                                "right now; retry")
            return m
    if name in router.known_models() or canon in router.known_models():
        if canon == (canonical_name(router.cfg.embedding_model) or router.cfg.embedding_model):
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"no healthy worker serves embedding model {canon!r} "
                                                            "right now; retry")
        raise invalid("model", f"{name!r} is a generation model: it cannot embed; use an embedding model ("
                               + (", ".join(served) or "none served here") + ")")
    hint = ", ".join(served) if served else "none (start the stack with `switchyard up --embedding-workers 1`)"
    raise RequestError(grpc.StatusCode.NOT_FOUND, f"model {name!r} is not served here; embedding models: {hint}",
                       "model")


def check_texts(texts, cfg, max_tokens: int) -> None:
    """Count and size before tokenizing (a huge text must not cost tokenizer time)."""
    if len(texts) == 0:
        raise invalid("texts", "give at least one text")
    if len(texts) > cfg.embedding_max_texts:
        raise invalid("texts", f"{len(texts)} texts; at most embedding_max_texts = {cfg.embedding_max_texts} per "
                               "request: split them over several requests")
    max_chars = max_tokens * cfg.prompt_chars_per_token
    for i, t in enumerate(texts):
        if not t:
            raise invalid(f"texts[{i}]", "is empty; every text needs at least one character")
        if len(t) > max_chars:
            raise invalid(f"texts[{i}]", f"has {len(t)} characters; the model takes at most {max_tokens} tokens "
                                         f"per text (longer input is refused, not truncated): shorten or split it")


def check_tokens(ids: list[list[int]], model: str, max_tokens: int) -> None:
    for i, t in enumerate(ids):
        if len(t) > max_tokens:
            raise invalid(f"texts[{i}]", f"has {len(t)} tokens; {model!r} takes at most {max_tokens} tokens per "
                                         "text (longer input is refused, not truncated): shorten or split it")


def _max_tokens(views) -> int:
    return min(w.heartbeat.max_model_len for w in views if w.heartbeat.max_model_len) if any(
        w.heartbeat.max_model_len for w in views) else 256


async def embed(router, request: inference_pb2.EmbedRequest, context: grpc.aio.ServicerContext):
    """The whole of Inference/Embed (router/service.py delegates here)."""
    if router.draining:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the router is shutting down; retry on another replica")
    try:
        model = resolve_embedding_model(router, request.model)
        views = embedding_views(router, model)
        max_tokens = _max_tokens(views)
        check_texts(request.texts, router.cfg, max_tokens)
        rid = request.request_id or uuid.uuid4().hex
        try:
            subjects.check_token(rid, "request_id")
        except ValueError as e:
            raise invalid("request_id", str(e)) from None
        if request.service_class not in ("", "interactive", "batch"):
            raise invalid("service_class", f"{request.service_class!r}: use interactive or batch")
        tok = await asyncio.get_running_loop().run_in_executor(None, load_embedding_tokenizer, model)
        ids = await router.run_tokenizer(tok.encode_batch, list(request.texts))
        check_tokens(ids, model, max_tokens)
        lengths = [len(t) for t in ids]
        breq = bus_pb2.BatchRequest(request_id=rid, prompt_token_ids=[i for t in ids for i in t], embed=True,
                                    embed_lengths=lengths, reply_subject=subjects.tokens(rid),
                                    service_class=request.service_class)
        limit = router._bus_limit()
        if breq.ByteSize() + 256 > limit or len(ids) * VECTOR_BYTES + 4096 > limit:
            raise invalid("texts", f"{len(ids)} texts do not fit the bus limit of {limit} bytes (nats_max_payload); "
                                   "send fewer texts per request")
        remaining = context.time_remaining()
        if remaining is not None:
            breq.deadline_unix_ms = int((time.time() + remaining) * 1000)
        worker_id = min(views, key=lambda w: (w.load, w.worker_id)).worker_id
        chunk = await _round_trip(router, worker_id, breq)
    except RequestError as e:
        router.metrics.errors.labels(request.model, e.code.name).inc()
        await context.abort(e.code, e.message)
        return
    if chunk.error:
        code = CHUNK_ERROR_STATUS.get(chunk.error, grpc.StatusCode.INTERNAL)
        router.metrics.errors.labels(model, code.name).inc()
        trailers = (("retry-after-ms", str(chunk.retry_after_ms or 100)),) \
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED else ()
        await context.abort(code, chunk.error_message, trailing_metadata=trailers)
    vectors = np.frombuffer(chunk.embed_vectors, dtype="<f4").reshape(len(lengths), chunk.embed_dim)
    resp = inference_pb2.EmbedResponse(model=model, prompt_tokens=sum(lengths), worker_id=worker_id)
    for i, (row, n) in enumerate(zip(vectors.tolist(), lengths)):
        resp.data.add(index=i, values=row, tokens=n)
    return resp


async def _round_trip(router, worker_id: str, breq: bus_pb2.BatchRequest) -> bus_pb2.TokenChunk:
    """Publish on sy.req.<worker>, wait for the one chunk; a worker leaving the table meanwhile is
    UNAVAILABLE, and a caller that goes away (cancel, deadline) cancels the request at the batcher."""
    rid = breq.request_id
    got: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_chunk(msg) -> None:
        if not got.done():
            got.set_result(msg.data)

    sub = await router.nc.subscribe(subjects.tokens(rid), cb=on_chunk)   # before publishing: no race
    view = router.table.workers.get(worker_id)
    if view is not None:
        view.in_flight += 1
    finished = False
    try:
        await router.nc.publish(subjects.request(worker_id), breq.SerializeToString())
        while True:
            done, _ = await asyncio.wait([got], timeout=WORKER_CHECK_S)
            if done:
                finished = True
                return bus_pb2.TokenChunk.FromString(got.result())
            w = router.table.workers.get(worker_id)
            if w is None or not w.heartbeat.healthy:
                finished = True
                raise RequestError(grpc.StatusCode.UNAVAILABLE, f"embedding worker {worker_id} stopped responding; "
                                                                "retry")
    finally:
        if view is not None:
            view.in_flight = max(0, view.in_flight - 1)
        try:
            if not finished:
                await router.nc.publish(subjects.cancel(rid), bus_pb2.Cancel(request_id=rid).SerializeToString())
            await sub.unsubscribe()
        except nats.errors.Error as e:   # NATS closing under us: nothing more to clean up there
            log.debug("embed %s cleanup: %r", rid, e)
