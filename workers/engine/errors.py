"""Errors the engine raises for bad input, before anything is queued.

Each carries its answer as data: `code` (the gRPC status name it maps to: services answer with
`grpc.StatusCode[e.code]`), `field` (the request field at fault, "" if none) and `message` (what to
change, without the field). `str(e)` is "field: message" when there is a field, for logs and for
the error text the batcher puts on the bus. Nothing here imports grpc: the engine is a library.
"""
from __future__ import annotations


class EngineError(Exception):
    code = "INTERNAL"

    def __init__(self, message: str, *, field: str = "", retry_after_ms: int = 0):
        super().__init__(f"{field}: {message}" if field else message)
        self.message = message
        self.field = field
        self.retry_after_ms = retry_after_ms


class InvalidRequestError(EngineError, ValueError):
    """A request field is wrong; the message names the allowed range (INVALID_ARGUMENT)."""
    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str):
        super().__init__(message, field=field)


class UnknownModelError(EngineError, ValueError):
    """The model name is neither built in nor a path we can load (NOT_FOUND)."""
    code = "NOT_FOUND"


class UnknownAdapterError(EngineError, ValueError):
    """The adapter id names no adapter this engine knows (NOT_FOUND); nothing was queued."""
    code = "NOT_FOUND"

    def __init__(self, message: str):
        super().__init__(message)
        self.field = "adapter_id"   # str(e) stays the message alone: it names the adapter already


class QueueFullError(EngineError):
    """The waiting queue is at its bound; retry after `retry_after_ms` (RESOURCE_EXHAUSTED)."""
    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_ms: int):
        super().__init__(message, retry_after_ms=retry_after_ms)
