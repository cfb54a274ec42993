"""Validate a GenerateRequest before anything is queued (DESIGN.md, "Errors").

Every failure names the field, so the person reading the error knows what to change.
"""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

import grpc

from common import subjects
from protos.switchyard.v1 import inference_pb2
from workers.engine.errors import InvalidRequestError
from workers.engine.sampling_params import SamplingParams
from workers.step_codec import sampling_from_proto

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
PRIORITY_RANGE = (-100, 100)


class RequestError(Exception):
    """A request the router refuses; carries the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str = ""):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


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
