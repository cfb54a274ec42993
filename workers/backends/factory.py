"""StackConfig.backend -> a Backend (workers/backends/base.py): the one place that names every backend.

It sits above base.py and the backends it picks (triton.py, trtllm.py), which import base.py; the heavy
imports (tritonclient, tensorrt_llm) happen here, lazily, only for the backend asked for.
"""
from __future__ import annotations

from workers.backends.base import Backend


def make_backend(kind: str, url: str, model: str, **kw) -> Backend:
    """StackConfig.backend -> a Backend. Heavy imports happen here, lazily."""
    kind = kind.strip().lower().replace("_", "-")
    if kind == "triton":
        from workers.backends.triton import TritonBackend
        return TritonBackend(url, model, **kw)
    if kind in ("tensorrt-llm", "trtllm", "trt-llm"):
        from workers.backends.trtllm import TrtLlmBackend
        return TrtLlmBackend(model, **kw)
    raise ValueError(f"unknown backend {kind!r}; choose switchyard, triton or tensorrt-llm")
