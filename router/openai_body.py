"""OpenAI request bodies <-> switchyard.v1 messages, shared by the HTTP front door (services/openai_http.py)
and the bulk-job runner (router/batch_runner.py), so a batch line and an online request mean the same.

Bodies are checked the way OpenAI checks them: an unknown field is refused ("Unrecognized request
argument supplied: X"), a known one we cannot honour (n > 1, tools, logit_bias...) is refused naming it,
and wrong types name the parameter. Responses are plain dicts in OpenAI's shapes.
"""
from __future__ import annotations

import time

from protos.switchyard.v1 import common_pb2, inference_pb2

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
ENDPOINTS = (CHAT, COMPLETIONS, EMBEDDINGS)

FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
          common_pb2.FINISH_REASON_ABORT: "stop"}

_SAMPLING = {"max_tokens", "temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty"}
_COMMON = {"model", "stream", "stream_options", "n", "user", "logit_bias", "logprobs", "metadata",
           "service_tier", "store"} | _SAMPLING
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                         "tool_choice", "parallel_tool_calls", "modalities"}
EMBEDDING_FIELDS = {"model", "input", "encoding_format", "dimensions", "user"}


class BodyError(Exception):
    """A body OpenAI would refuse with 400 invalid_request_error (or 404 model_not_found)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


def _unknown(body: dict, known: set[str]) -> None:
    if not isinstance(body, dict):
        raise BodyError("the request body must be a JSON object")
    for k in body:
        if k not in known:
            raise BodyError(f"Unrecognized request argument supplied: {k}", param=k)


def _number(body: dict, key: str, lo: float, hi: float, integer: bool = False):
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        raise BodyError(f"'{key}' must be {'an integer' if integer else 'a number'}, got {v!r}", param=key)
    if not lo <= v <= hi:
        raise BodyError(f"'{key}' must be in [{lo}, {hi}], got {v!r}", param=key)
    return v


def _not_supported(body: dict, key: str, allowed) -> None:
    v = body.get(key)
    if v is not None and v not in allowed:
        raise BodyError(f"'{key}' = {v!r} is not supported by this server", param=key)


def _model(body: dict, default_model: str) -> str:
    m = body.get("model", default_model) or default_model
    if not isinstance(m, str) or not m:
        raise BodyError("'model' is required (a string naming a served model)", param="model")
    return m


def _sampling(body: dict, out: common_pb2.SamplingParams, max_tokens_key: str = "max_tokens") -> None:
    mt = _number(body, max_tokens_key, 1, 1 << 30, integer=True)
    if max_tokens_key != "max_tokens" and mt is None:
        mt = _number(body, "max_tokens", 1, 1 << 30, integer=True)
    if mt is not None:
        out.max_tokens = mt
    t = _number(body, "temperature", 0.0, 2.0)
    if t is not None:
        out.temperature = float(t)
    p = _number(body, "top_p", 0.0, 1.0)
    if p is not None:
        if p == 0:
            raise BodyError("'top_p' must be greater than 0", param="top_p")
        out.top_p = float(p)
    s = _number(body, "seed", -(1 << 63), (1 << 64) - 1, integer=True)
    if s is not None:
        out.seed = s % (1 << 64)   # OpenAI takes any int64; the engine's seed is unsigned
    pp = _number(body, "presence_penalty", -2.0, 2.0)
    if pp:
        out.presence_penalty = float(pp)
    fp = _number(body, "frequency_penalty", -2.0, 2.0)
    if fp:
        raise BodyError("'frequency_penalty' other than 0 is not supported by this server; use presence_penalty",
                        param="frequency_penalty")
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(x, str) and x for x in stops):
            raise BodyError("'stop' must be a non-empty string or a list of them", param="stop")
        out.stop.extend(stops)


def _common(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage); refuses what we cannot honour."""
    _not_supported(body, "n", (1,))
    _not_supported(body, "logit_bias", ({},))
    _not_supported(body, "service_tier", ("auto", "default"))
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise BodyError("'stream' must be a boolean", param="stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not stream:
            raise BodyError("'stream_options' is only allowed when 'stream' is true", param="stream_options")
        if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
            raise BodyError("'stream_options' takes only 'include_usage'", param="stream_options")
        include_usage = bool(opts.get("include_usage"))
    for key in ("user", "metadata", "store"):
        if key in body and key == "user" and body[key] is not None and not isinstance(body[key], str):
            raise BodyError("'user' must be a string", param="user")
    return stream, include_usage


def parse_completion(body: dict, default_model: str = "") -> tuple[inference_pb2.GenerateRequest, bool, bool]:
    """A /v1/completions body -> (GenerateRequest, stream, include_usage)."""
    _unknown(body, COMPLETION_FIELDS)
    stream, include_usage = _common(body)
    _not_supported(body, "echo", (False,))
    _not_supported(body, "best_of", (1,))
    _not_supported(body, "suffix", ("",))
    _not_supported(body, "logprobs", (0,))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise BodyError("'prompt' must be a non-empty string (one prompt per request here)", param="prompt")
    req = inference_pb2.GenerateRequest(model=_model(body, default_model), prompt=prompt)
    _sampling(body, req.sampling)
    if not req.sampling.HasField("max_tokens"):
        req.sampling.max_tokens = 16   # OpenAI's default for completions
    return req, stream, include_usage


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list):   # content parts: text only
        parts = []
        for p in c:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise BodyError(f"messages[{i}].content: only text parts are supported", param=f"messages[{i}].content")
            parts.append(p["text"])
        return "".join(parts)
    if c is None and m.get("role") == "assistant":
        return ""
    raise BodyError(f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}].content")


def parse_chat(body: dict, default_model: str = "") -> tuple[inference_pb2.GenerateRequest, bool, bool]:
    """A /v1/chat/completions body -> (GenerateRequest, stream, include_usage)."""
    _unknown(body, CHAT_FIELDS)
    stream, include_usage = _common(body)
    _not_supported(body, "logprobs", (False,))
    _not_supported(body, "top_logprobs", (0,))
    if body.get("tools"):
        raise BodyError("'tools' are not supported by this server", param="tools")
    _not_supported(body, "tool_choice", ("none", "auto"))
    rf = body.get("response_format")
    if rf is not None and rf != {"type": "text"}:
        raise BodyError("'response_format' other than {\"type\": \"text\"} is not supported", param="response_format")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BodyError("'messages' must be a non-empty list", param="messages")
    req = inference_pb2.GenerateRequest(model=_model(body, default_model))
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BodyError(f"messages[{i}] must be an object with a 'role'", param=f"messages[{i}]")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise BodyError(f"messages[{i}]: unrecognized field(s) {sorted(extra)}", param=f"messages[{i}]")
        role = "system" if m["role"] == "developer" else m["role"]
        req.messages.add(role=role, content=_content(m, i))
    _sampling(body, req.sampling, "max_completion_tokens")
    return req, stream, include_usage


def parse_embeddings(body: dict, default_model: str = "") -> tuple[inference_pb2.EmbedRequest, str]:
    """A /v1/embeddings body -> (EmbedRequest, encoding_format)."""
    _unknown(body, EMBEDDING_FIELDS)
    inp = body.get("input")
    texts = [inp] if isinstance(inp, str) else inp
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise BodyError("'input' must be a non-empty string or a list of non-empty strings (token ids are not "
                        "supported)", param="input")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise BodyError("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    if body.get("dimensions") is not None:
        raise BodyError("'dimensions' is not supported by this server", param="dimensions")
    return inference_pb2.EmbedRequest(model=_model(body, default_model), texts=texts), fmt


def parse(endpoint: str, body: dict, default_model: str = ""):
    """(request message, stream) for a batch line's url."""
    if endpoint == CHAT:
        req, stream, _ = parse_chat(body, default_model)
    elif endpoint == COMPLETIONS:
        req, stream, _ = parse_completion(body, default_model)
    elif endpoint == EMBEDDINGS:
        req, _ = parse_embeddings(body, default_model)
        stream = False
    else:
        raise BodyError(f"url {endpoint!r} is not supported; use one of {', '.join(ENDPOINTS)}", param="url")
    return req, stream


# ---- responses ---------------------------------------------------------------------------------------
def usage_dict(u: common_pb2.Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}, "cost_usd": u.cost_usd,
            # speculative decoding's drafts, in OpenAI's fields for predicted tokens accepted / not
            "completion_tokens_details": {"accepted_prediction_tokens": u.spec_accepted_tokens,
                                          "rejected_prediction_tokens": max(0, u.spec_proposed_tokens
                                                                            - u.spec_accepted_tokens)}}


def completion_id(endpoint: str, request_id: str) -> str:
    return ("chatcmpl-" if endpoint == CHAT else "cmpl-") + request_id


def full_response(endpoint: str, request_id: str, model: str, text: str, finish: int, usage: common_pb2.Usage,
                  created: int | None = None) -> dict:
    """The non-streaming response of a chat or completion."""
    created = int(time.time()) if created is None else created
    reason = FINISH.get(finish, "stop")
    if endpoint == CHAT:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                  "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        obj = "text_completion"
    return {"id": completion_id(endpoint, request_id), "object": obj, "created": created, "model": model,
            "choices": [choice], "usage": usage_dict(usage)}


def stream_chunk(endpoint: str, request_id: str, model: str, created: int, text: str | None,
                 finish: int = 0, first: bool = False) -> dict:
    """One server-sent event of a streaming chat or completion."""
    reason = FINISH.get(finish) if finish else None
    if endpoint == CHAT:
        delta: dict = {"role": "assistant", "content": text or ""} if first else \
            ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
        obj = "text_completion"
    return {"id": completion_id(endpoint, request_id), "object": obj, "created": created, "model": model,
            "choices": [choice]}


def usage_chunk(endpoint: str, request_id: str, model: str, created: int, usage: common_pb2.Usage) -> dict:
    """stream_options.include_usage: the last event, with no choices."""
    obj = "chat.completion.chunk" if endpoint == CHAT else "text_completion"
    return {"id": completion_id(endpoint, request_id), "object": obj, "created": created, "model": model,
            "choices": [], "usage": usage_dict(usage)}


def embeddings_response(resp: inference_pb2.EmbedResponse, model: str, encoding_format: str = "float") -> dict:
    data = []
    for v in sorted(resp.data, key=lambda d: d.index):
        if encoding_format == "base64":
            import base64

            import numpy as np
            emb = base64.b64encode(np.asarray(v.values, dtype="<f4").tobytes()).decode()
        else:
            emb = list(v.values)
        data.append({"object": "embedding", "index": v.index, "embedding": emb})
    return {"object": "list", "data": data, "model": resp.model or model,
            "usage": {"prompt_tokens": resp.prompt_tokens, "total_tokens": resp.prompt_tokens}}
