"""The contract between the pass-through batcher (batcher/passthrough.py) and an external engine.

Triton and TensorRT-LLM batch in flight themselves, so Switchyard does not plan their steps: the
pass-through batcher admits, prioritises and relays, and a Backend turns one request into one
async stream of chunks. Plain dataclasses in, plain dataclasses out; protobufs stay at the edges.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import AsyncIterator

from workers.engine.sampling_params import SamplingParams

# Our error vocabulary (mapped to gRPC statuses by the router via bus.ChunkError).
INVALID = "invalid"            # -> INVALID_ARGUMENT
NOT_FOUND = "not_found"        # -> NOT_FOUND (reported as INVALID on the bus, message says so)
UNAVAILABLE = "unavailable"    # -> UNAVAILABLE
EXHAUSTED = "exhausted"        # -> RESOURCE_EXHAUSTED
INTERNAL = "internal"          # -> INTERNAL


class BackendError(RuntimeError):
    """A failure with one of the codes above and a message a person can act on."""

    def __init__(self, code: str, message: str, retry_after_ms: int = 0):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms


class BackendMissingError(BackendError):
    """The backend's Python package is not installed (e.g. tensorrt_llm on a CPU box)."""

    def __init__(self, package: str, backend: str, hint: str = ""):
        super().__init__(UNAVAILABLE, f"backend {backend!r} needs the Python package {package!r}, which is not "
                                      f"installed{': ' + hint if hint else ''}")
        self.package = package


@dataclass
class BackendRequest:
    request_id: str
    prompt_text: str
    prompt_token_ids: list[int] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    priority: int = 0
    deadline_s: float | None = None      # seconds left when relayed; None = no deadline


@dataclass
class BackendChunk:
    """New output since the previous chunk; the last one has finish_reason set."""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    num_new_tokens: int = 0              # tokens this chunk stands for (token_ids may be unknown)
    finish_reason: str | None = None     # "stop" | "length" | "abort"
    prompt_tokens: int | None = None     # when the backend reports it (last chunk)


@dataclass
class BackendStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    num_free_blocks: int = 0
    num_blocks: int = 0
    block_size: int = 0


class Backend(abc.ABC):
    """One external engine serving one model. All methods are coroutines on one event loop."""

    name = "backend"
    model: str = ""                      # the model name on the backend
    max_model_len: int = 0               # 0: unknown (the router then uses its own limit)

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect and check readiness/metadata; raise BackendError with a clear message if unusable."""

    @abc.abstractmethod
    async def ready(self) -> bool:
        """Is the backend up and the model loaded right now (cheap; polled for heartbeats)?"""

    @abc.abstractmethod
    def generate(self, request: BackendRequest) -> AsyncIterator[BackendChunk]:
        """Stream the completion. Raises BackendError. Closing the iterator cancels the request."""

    async def cancel(self, request_id: str) -> None:
        """Best-effort cancel by id (streams are also cancelled by closing their iterator)."""

    async def load(self) -> None:
        raise BackendError(INVALID, f"{self.name} backend cannot load models")

    async def unload(self) -> None:
        raise BackendError(INVALID, f"{self.name} backend cannot unload models")

    def stats(self) -> BackendStats | None:
        """Engine-side load, when the backend reports it (else the batcher's own counts are used)."""
        return None

    async def kv_events(self) -> list:
        """KV events (kv_manager.events.KvEvent) since the last call; [] if the backend has none."""
        return []

    async def close(self) -> None:
        pass

