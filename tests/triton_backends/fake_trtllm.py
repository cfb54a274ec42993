"""A stand-in for the `tensorrt_llm` package with the LLM API's shapes (what our adapter touches).

Mirrors: `LLM(model=..., kv_cache_config=KvCacheConfig(...))`, `LLM.generate_async(prompt,
sampling_params=SamplingParams(...), streaming=True)` returning an async-iterable result with
`.abort()`, whose items are RequestOutput-like (`.outputs[0].text` / `.token_ids` cumulative,
`.outputs[0].finish_reason`, `.finished`, `.prompt_token_ids`), `LLM.get_kv_cache_events(timeout)`
as the serialized dicts of `KVCacheEventSerializer`, and `LLM.get_stats(timeout)` iteration stats.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class KvCacheConfig:
    enable_block_reuse: bool = True
    event_buffer_max_size: int = 0
    free_gpu_memory_fraction: float | None = None


class SamplingParams:  # keyword-only like the real one; records what it was given
    def __init__(self, *, max_tokens=32, temperature=None, top_k=None, top_p=None, min_p=None,
                 repetition_penalty=None, presence_penalty=None, seed=None, stop=None, stop_token_ids=None,
                 ignore_eos=False, logprobs=None, detokenize=True, end_id=None, n=1):
        self.__dict__.update({k: v for k, v in locals().items() if k != "self"})


@dataclass
class CompletionOutput:
    index: int = 0
    text: str = ""
    token_ids: list = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list
    outputs: list
    finished: bool = False


class _Result:
    def __init__(self, llm, rid, prompt_ids, sp):
        self.llm, self.rid, self.prompt_ids, self.sp = llm, rid, prompt_ids, sp
        self.aborted = False

    def abort(self):
        self.aborted = True
        self.llm.aborted.append(self.rid)

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        text, ids = "", []
        n = self.sp.max_tokens
        for i in range(n):
            await asyncio.sleep(self.llm.step_s)
            if self.aborted:
                return
            tok = 1000 + i
            ids.append(tok)
            text += f"t{i} "
            done = i == n - 1
            yield RequestOutput(self.rid, self.prompt_ids,
                                [CompletionOutput(0, text, list(ids), "length" if done else None)], done)
            if i == 0:  # the prompt's full blocks are now cached: report them like TensorRT-LLM does
                self.llm._store(self.prompt_ids)


class LLM:
    tokens_per_block = 4

    def __init__(self, model: str, kv_cache_config: KvCacheConfig | None = None, **kw):
        self.model, self.kv_cache_config, self.kw = model, kv_cache_config, kw
        self.max_seq_len = 2048
        self.step_s = 0.001
        self.requests: list[tuple[list, SamplingParams]] = []
        self.aborted: list[int] = []
        self._events = [{"event_id": 0, "data": {"type": "created", "num_blocks_per_cache_level": [64, 0]},
                         "window_size": 2048}]
        self._eid = 1
        self._hash_of: dict[tuple, int] = {}

    def generate_async(self, inputs, sampling_params=None, streaming=False, **kw):
        ids = list(inputs) if isinstance(inputs, list) else [ord(c) for c in inputs]
        self.requests.append((ids, sampling_params))
        return _Result(self, len(self.requests), ids, sampling_params)

    def _store(self, ids):
        bs = self.tokens_per_block
        parent = None
        blocks = []
        for i in range(len(ids) // bs):
            key = tuple(ids[: (i + 1) * bs])
            h = self._hash_of.setdefault(key, 0x5EED0000 + len(self._hash_of))   # TRT's own hash space
            blocks.append({"type": "stored_block", "block_hash": h,
                           "tokens": [{"type": "unique_token", "token_id": t, "token_extra_id": 0}
                                      for t in ids[i * bs:(i + 1) * bs]], "cache_level": 0, "priority": 35})
        if blocks:
            self._events.append({"event_id": self._eid, "data": {"type": "stored", "parent_hash": parent,
                                                                "blocks": blocks}, "window_size": 2048})
            self._eid += 1

    def evict_all(self):
        self._events.append({"event_id": self._eid, "data": {"type": "removed",
                                                            "block_hashes": list(self._hash_of.values())},
                             "window_size": 2048})
        self._eid += 1

    def get_kv_cache_events(self, timeout=2):
        ev, self._events = self._events, []
        return ev

    def get_stats(self, timeout=2):
        return [{"iter": 1, "numActiveRequests": 2, "numQueuedRequests": 1,
                 "kvCacheStats": {"maxNumBlocks": 64, "freeNumBlocks": 48, "usedNumBlocks": 16,
                                  "tokensPerBlock": self.tokens_per_block}}]

    def shutdown(self):
        pass
