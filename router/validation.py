"""Validate a GenerateRequest before anything is queued (DESIGN.md, "Errors").

Every failure names the field, so the person reading the error knows what to change.
"""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

import grpc

from common import subjects
from protos.switchyard.v1 import bus_pb2, inference_pb2
from workers.engine.errors import InvalidRequestError
from workers.engine.sampling_params import SamplingParams
from workers.step_codec import sampling_from_proto

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
PRIORITY_RANGE = (-100, 100)


# A batcher's error chunk (TokenChunk.error) as the gRPC status the client gets: one table for
# every RPC the router relays (Generate, Embed).
CHUNK_ERROR_STATUS = {
    bus_pb2.CHUNK_ERROR_QUEUE_FULL: grpc.StatusCode.RESOURCE_EXHAUSTED,
    bus_pb2.CHUNK_ERROR_INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    bus_pb2.CHUNK_ERROR_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    bus_pb2.CHUNK_ERROR_INTERNAL: grpc.StatusCode.INTERNAL,
    bus_pb2.CHUNK_ERROR_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    bus_pb2.CHUNK_ERROR_DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,   # queued past its deadline (batcher)
}


class RequestError(Exception):
    """A request the router refuses; carries the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str = "", retry_after_ms: int = 0):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.retry_after_ms = retry_after_ms   # RESOURCE_EXHAUSTED: sent as the retry-after-ms trailer


def invalid(field: str, message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}", field)


@dataclass
class ValidRequest:
    request_id: str
    model: str
    prompt: str                        # "" when messages are used
    messages: list[dict]               # [] when prompt is used
    sampling: SamplingParams
    priority: int
    adapter_id: str | None


def resolve_model(model: str, intent: str, known_models: list[str], default_model: str) -> str:
    """The model to serve: the named one, or (by intent) the default. NOT_FOUND lists known ones."""
    if not model:
        if not intent:
            raise invalid("model", "set model (one of " + ", ".join(sorted(known_models)) + ") or intent")
        # Intent routing picks among served models; with one model family served it is the default.
        model = default_model
    if model not in known_models:
        raise RequestError(grpc.StatusCode.NOT_FOUND,
                           f"model {model!r} is not served here; known models: "
                           f"{', '.join(sorted(known_models)) or 'none'}",
                           "model")
    return model


def check_input(prompt: str, messages) -> list[dict]:
    """Exactly one of prompt / messages, non-empty; returns messages as dicts."""
    if prompt and len(messages):
        raise invalid("prompt", "set either prompt or messages, not both")
    if not prompt and not len(messages):
        raise invalid("prompt", "must not be empty (set prompt, or messages for chat)")
    out = []
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise invalid(f"messages[{i}].role", f"must be one of {sorted(CHAT_ROLES)}, got {m.role!r}")
        out.append({"role": m.role, "content": m.content})
    return out


def check_sampling(pb) -> SamplingParams:
    sp = sampling_from_proto(pb)
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty"):
        if not math.isfinite(getattr(sp, name)):
            raise invalid(name, "must be a finite number")
    try:
        sp.validate()
    except InvalidRequestError as e:
        raise invalid(e.field, e.message) from None
    return sp


def validate_generate(req: inference_pb2.GenerateRequest, known_models: list[str],
                      default_model: str, adapters=()) -> ValidRequest:
    """Field checks that need no tokenizer. Raises RequestError."""
    model = resolve_model(req.model, req.intent, known_models, default_model)
    messages = check_input(req.prompt, req.messages)
    sampling = check_sampling(req.sampling)
    lo, hi = PRIORITY_RANGE
    if not lo <= req.priority <= hi:
        raise invalid("priority", f"must be in [{lo}, {hi}], got {req.priority}")
    if req.request_id:
        try:
            subjects.check_token(req.request_id, "request_id")
        except ValueError as e:
            raise invalid("request_id", str(e).split(" ", 1)[1]) from None
        rid = req.request_id
    else:
        rid = uuid.uuid4().hex
    if req.adapter_id and req.adapter_id not in adapters:
        # `adapters`: the LoRA adapters routable workers advertise in their heartbeats.
        raise RequestError(grpc.StatusCode.NOT_FOUND,
                           f"adapter {req.adapter_id!r} is not loaded on any worker; known adapters: "
                           f"{', '.join(sorted(adapters)) or 'none'}", "adapter_id")
    return ValidRequest(rid, model, req.prompt, messages, sampling, req.priority, req.adapter_id or None)


def check_prompt_length(num_tokens: int, max_model_len: int) -> None:
    """The prompt must leave room for at least one generated token."""
    if num_tokens >= max_model_len:
        raise invalid("prompt", f"{num_tokens} tokens exceeds the context of {max_model_len} tokens "
                                f"(at most {max_model_len - 1} prompt tokens)")


def max_prompt_chars(cfg, max_model_len: int) -> int:
    """The prompt's character limit: the config's, else the context times a generous chars-per-token."""
    return cfg.max_prompt_chars or max(1, max_model_len) * max(1, cfg.prompt_chars_per_token)


def check_limits(prompt: str, messages, sampling_pb, cfg, max_model_len: int) -> None:
    """Size limits checked before any work (tokenizing included): each refusal names the config key,
    the limit and the value. `messages`: the request's chat messages (content counted as the prompt)."""
    chars = len(prompt) + sum(len(m.content) + len(m.role) for m in messages)
    limit = max_prompt_chars(cfg, max_model_len)
    if chars > limit:
        raise invalid("prompt", f"{chars} characters exceeds the limit of {limit} characters "
                                f"(max_prompt_chars; the model's context is {max_model_len} tokens)")
    stop = sampling_pb.stop
    if len(stop) > cfg.max_stop_strings:
        raise invalid("stop", f"{len(stop)} stop strings exceeds the limit of {cfg.max_stop_strings} "
                              "(max_stop_strings)")
    stop_bytes = sum(len(s.encode("utf-8", "surrogatepass")) for s in stop)
    if stop_bytes > cfg.max_stop_bytes:
        raise invalid("stop", f"stop strings of {stop_bytes} bytes together exceed the limit of "
                              f"{cfg.max_stop_bytes} bytes (max_stop_bytes)")
    n_ids = len(sampling_pb.stop_token_ids)
    if n_ids > cfg.max_stop_token_ids:
        raise invalid("stop_token_ids", f"{n_ids} ids exceeds the limit of {cfg.max_stop_token_ids} "
                                        "(max_stop_token_ids)")


def check_prompt_tokens(num_tokens: int, cfg, max_model_len: int) -> None:
    """The prompt's token count against max_prompt_tokens (when set) and the context."""
    if cfg.max_prompt_tokens and num_tokens > cfg.max_prompt_tokens:
        raise invalid("prompt", f"{num_tokens} tokens exceeds the limit of {cfg.max_prompt_tokens} tokens "
                                "(max_prompt_tokens)")
    check_prompt_length(num_tokens, max_model_len)


def check_stop_token_ids(ids, vocab_size: int) -> None:
    """Every stop token id within the model's vocabulary [0, vocab_size)."""
    for i in ids:
        if not 0 <= i < vocab_size:
            raise invalid("stop_token_ids", f"{i} is not a token id of this model (ids are in [0, {vocab_size}))")


def check_bus_size(nbytes: int, limit: int) -> None:
    """A request as published on NATS must fit the connection's max_payload."""
    if nbytes > limit:
        raise invalid("prompt", f"the request is {nbytes} bytes on the bus, over the NATS payload limit of "
                                f"{limit} bytes (nats_max_payload / the server's max_payload); shorten the "
                                "prompt or the stop lists")
