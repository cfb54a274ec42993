"""TensorRT-LLM backend: `tensorrt_llm.LLM` (the LLM API) driven by the pass-through batcher.

* requests: `LLM.generate_async(prompt, sampling_params=SamplingParams(...), streaming=True)`;
  each streamed RequestOutput carries the cumulative `.outputs[0].text` / `.token_ids` and
  `.finished`; we relay the difference. Closing our stream calls `.abort()` on the request.
  The prompt is sent as the router's token ids (so KV events hash the same tokens the router does).
* sampling: ours -> `tensorrt_llm.SamplingParams` (max_tokens, temperature, top_k (0 -> None),
  top_p, min_p, repetition_penalty, presence_penalty, seed, stop, stop_token_ids, ignore_eos,
  logprobs). Fields the installed version lacks are left out, never guessed.
* KV events: `LLM.get_kv_cache_events(timeout)` (enable with KvCacheConfig(event_buffer_max_size>0,
  enable_block_reuse=True)) returns dicts {"event_id", "data": {"type": "created"|"stored"|
  "removed"|"updated", ...}, "window_size"}. TensorRT-LLM's block hashes are its own, so stored
  blocks are re-hashed with our chained hash (kv_manager/block_hash.py) over their token ids and the
  mapping is kept for "removed"; then the KV index and KV-aware routing treat this worker like ours.
* load: `LLM.get_stats(timeout)` iteration stats (numActiveRequests, numQueuedRequests,
  kvCacheStats{maxNumBlocks, freeNumBlocks, usedNumBlocks, tokensPerBlock}) -> heartbeats.

TensorRT-LLM has no wheel on the registries these machines reach: it is imported lazily and a
missing package is a clear BackendMissingError. Tested only against a fake with the same shapes
(tests/triton_backends/fake_trtllm.py), not against TensorRT-LLM itself.
"""
from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
from typing import AsyncIterator

from kv_manager.block_hash import hash_block
from kv_manager.events import CLEARED, REMOVED, STORED, KvEvent
from workers.backends.base import (
    INTERNAL,
    INVALID,
    Backend,
    BackendChunk,
    BackendError,
    BackendMissingError,
    BackendRequest,
    BackendStats,
)
from workers.engine.sampling_params import SamplingParams

log = logging.getLogger("switchyard.backends.trtllm")

INSTALL_HINT = ("install NVIDIA's `tensorrt-llm` wheel on a CUDA host (pip install tensorrt-llm "
                "--extra-index-url https://pypi.nvidia.com); see README 'TensorRT-LLM backend'")


def import_trtllm(module_name: str = "tensorrt_llm"):
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise BackendMissingError("tensorrt_llm", "tensorrt-llm", INSTALL_HINT) from e


def to_trt_sampling(trt, sp: SamplingParams):
    """Our SamplingParams -> tensorrt_llm.SamplingParams (only fields its constructor accepts)."""
    want = {"max_tokens": sp.max_tokens, "temperature": sp.temperature, "top_k": sp.top_k or None,
            "top_p": sp.top_p, "min_p": sp.min_p or None, "repetition_penalty": sp.repetition_penalty,
            "presence_penalty": sp.presence_penalty, "seed": sp.seed, "stop": list(sp.stop) or None,
            "stop_token_ids": list(sp.stop_token_ids) or None, "ignore_eos": sp.ignore_eos,
            "logprobs": 1 if sp.logprobs else None, "detokenize": True}
    try:
        accepted = set(inspect.signature(trt.SamplingParams).parameters)
    except (TypeError, ValueError):
        accepted = set(want)
    if "kwargs" in accepted:
        accepted = set(want)
    return trt.SamplingParams(**{k: v for k, v in want.items() if k in accepted and v is not None})


class KvEventTranslator:
    """TensorRT-LLM KV cache event dicts -> our KvEvents, re-hashed with our chained block hash."""

    def __init__(self, block_size: int = 0):
        self.block_size = block_size
        self.ours: dict[int, int] = {}        # TensorRT-LLM block hash -> our block hash

    def translate(self, events: list[dict]) -> list[KvEvent]:
        out: list[KvEvent] = []
        for ev in events or []:
            data = ev.get("data", {}) if isinstance(ev, dict) else {}
            kind = data.get("type")
            if kind == "created":
                self.ours.clear()
                out.append(KvEvent(CLEARED, [], block_size=self.block_size))
            elif kind == "stored":
                parent_trt = data.get("parent_hash")
                parent = self.ours.get(parent_trt) if parent_trt is not None else None
                if parent_trt is not None and parent is None:
                    continue   # its prefix was never reported to us: cannot chain, skip
                hashes, tokens = [], []
                first_parent = parent
                for b in data.get("blocks", []):
                    ids = [t["token_id"] if isinstance(t, dict) else int(t) for t in b.get("tokens", [])]
                    if not self.block_size:
                        self.block_size = len(ids)
                    h = hash_block(parent, ids, None)
                    self.ours[b["block_hash"]] = h
                    hashes.append(h)
                    tokens.extend(ids)
                    parent = h
                if hashes:
                    out.append(KvEvent(STORED, hashes, parent_hash=first_parent, token_ids=tokens,
                                       block_size=self.block_size))
            elif kind == "removed":
                gone = [self.ours.pop(h) for h in data.get("block_hashes", []) if h in self.ours]
                if gone:
                    out.append(KvEvent(REMOVED, gone, block_size=self.block_size))
            # "updated" (cache level / priority changes) does not change which prefixes are cached.
        return out


def stats_from_trt(stats: list[dict]) -> BackendStats | None:
    if not stats:
        return None
    s = stats[-1]
    kv = s.get("kvCacheStats") or {}
    total = int(kv.get("maxNumBlocks", 0))
    free = int(kv.get("freeNumBlocks", 0))
    used = int(kv.get("usedNumBlocks", max(0, total - free)))
    return BackendStats(num_running=int(s.get("numActiveRequests", 0)),
                        num_waiting=int(s.get("numQueuedRequests", 0)),
                        kv_usage=used / total if total else 0.0, num_free_blocks=free, num_blocks=total,
                        block_size=int(kv.get("tokensPerBlock", 0)))


class TrtLlmBackend(Backend):
    name = "tensorrt-llm"

    def __init__(self, model: str, *, module: str = "tensorrt_llm", llm=None, llm_kwargs: dict | None = None,
                 kv_events: bool = True):
        self.model = model
        self._module_name = module
        self.trt = None
        self.llm = llm                       # injectable (tests): an object with the LLM API
        self.llm_kwargs = dict(llm_kwargs or {})
        self.kv_events_enabled = kv_events
        self.translator = KvEventTranslator()
        self._stats: BackendStats | None = None
        self._live: dict[str, object] = {}

    async def start(self) -> None:
        self.trt = import_trtllm(self._module_name)
        if self.llm is None:
            kw = dict(self.llm_kwargs)
            if self.kv_events_enabled and "kv_cache_config" not in kw:
                kw["kv_cache_config"] = self.trt.KvCacheConfig(enable_block_reuse=True, event_buffer_max_size=1024)
            loop = asyncio.get_running_loop()
            self.llm = await loop.run_in_executor(None, lambda: self.trt.LLM(model=self.model, **kw))
        self.max_model_len = int(getattr(self.llm, "max_seq_len", 0) or 0)

    async def ready(self) -> bool:
        return self.llm is not None

    async def generate(self, req: BackendRequest) -> AsyncIterator[BackendChunk]:
        if self.llm is None:
            await self.start()
        try:
            sp = to_trt_sampling(self.trt, req.sampling)
        except (TypeError, ValueError) as e:
            raise BackendError(INVALID, f"TensorRT-LLM rejected the sampling settings: {e}") from e
        prompt = list(req.prompt_token_ids) or req.prompt_text
        try:
            result = self.llm.generate_async(prompt, sampling_params=sp, streaming=True)
        except (TypeError, ValueError) as e:
            raise BackendError(INVALID, f"TensorRT-LLM rejected the request: {e}") from e
        self._live[req.request_id] = result
        n_text, n_ids = 0, 0
        finished = False
        try:
            async for out in result:
                o = out.outputs[0]
                text, ids = o.text or "", list(o.token_ids or [])
                chunk = BackendChunk(text=text[n_text:], token_ids=ids[n_ids:], num_new_tokens=len(ids) - n_ids)
                n_text, n_ids = len(text), len(ids)
                if out.finished:
                    finished = True
                    reason = getattr(o, "finish_reason", None)
                    chunk.finish_reason = reason if reason in ("stop", "length") else (
                        "length" if n_ids >= req.sampling.max_tokens else "stop")
                    chunk.prompt_tokens = len(getattr(out, "prompt_token_ids", None) or req.prompt_token_ids)
                    yield chunk
                    return
                if chunk.text or chunk.token_ids:
                    yield chunk
            raise BackendError(INTERNAL, "TensorRT-LLM ended the stream without a finished output")
        finally:
            self._live.pop(req.request_id, None)
            if not finished:
                abort = getattr(result, "abort", None)
                if abort is not None:
                    abort()

    async def cancel(self, request_id: str) -> None:
        r = self._live.get(request_id)
        if r is not None and hasattr(r, "abort"):
            r.abort()

    def stats(self) -> BackendStats | None:
        return self._stats

    async def kv_events(self) -> list[KvEvent]:
        if self.llm is None:
            return []
        loop = asyncio.get_running_loop()
        get_stats = getattr(self.llm, "get_stats", None)
        if get_stats is not None:
            self._stats = stats_from_trt(await loop.run_in_executor(None, get_stats, 0.0)) or self._stats
        if not self.kv_events_enabled or not hasattr(self.llm, "get_kv_cache_events"):
            return []
        raw = await loop.run_in_executor(None, self.llm.get_kv_cache_events, 0.0)
        return self.translator.translate(raw)

    async def close(self) -> None:
        shutdown = getattr(self.llm, "shutdown", None)
        if shutdown is not None:
            await asyncio.get_running_loop().run_in_executor(None, shutdown)
