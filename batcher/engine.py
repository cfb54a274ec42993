"""The in-process engine: a model, its KV cache, a scheduler and a step loop in one object.

    from batcher.engine import Engine
    from workers.engine import SamplingParams
    eng = Engine.from_model("smollm2-135m")
    for out in eng.generate(["The capital of France is"], SamplingParams(max_tokens=32)):
        print(out.text)

It is the batcher and the worker in one process: this package's EngineCore (scheduler + block allocator,
batcher/engine_core.py) driving a local ModelRunner (workers/engine/model_runner.py) by call, where the
batcher service drives the same EngineCore over the worker's `Worker/Step` stream. So it sits above both
(docs/architecture.md, "Layers"); workers/engine/ is the model-execution library beneath it.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import torch

from batcher.engine_core import EngineStats, RequestOutput, build_engine_core
from workers.engine.config import EngineConfig
from workers.engine.errors import InvalidRequestError, UnknownAdapterError
from workers.engine.loader import LoadedModel, load_model
from workers.engine.model_runner import ModelRunner, resolve_dtype
from workers.engine.sampling_params import SamplingParams

Prompt = str | list[int] | list[dict]   # text, token ids, or chat messages


@dataclass
class CompletionOutput:
    request_id: str
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    logprobs: list[float] | None = None
    spec_proposed: int = 0          # speculative decoding: drafts verified, accepted, decode steps taken
    spec_accepted: int = 0
    decode_steps: int = 0


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.runner = ModelRunner(loaded, self.config)
        self.core = build_engine_core(self.config, num_blocks=self.runner.num_blocks,
                                      block_size=self.runner.block_size, max_model_len=self.runner.max_model_len,
                                      runner=self.runner, tokenizer=self.tokenizer,
                                      eos_token_ids=loaded.tokenizer.eos_token_ids or loaded.config.eos_token_ids,
                                      seed=self.config.seed)
        self.scheduler = self.core.scheduler
        self.allocator = self.scheduler.allocator
        self._ids = itertools.count()

    @classmethod
    def from_model(cls, name: str = "smollm2-135m", config: EngineConfig | None = None, *,
                   random_weights: str | None = None, **overrides) -> "Engine":
        """Load a built-in name, HF folder or GGUF file; `overrides` set EngineConfig fields."""
        config = replace(config or EngineConfig(), **overrides)
        loaded = load_model(name, device=config.device, dtype=resolve_dtype(config),
                            random_weights=random_weights, seed=config.seed)
        return cls(loaded, config)

    # ---- the step API ----------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt", "must not be empty")
            return self.tokenizer.encode(prompt)
        if prompt and isinstance(prompt[0], dict):
            return self.tokenizer.encode(self.tokenizer.apply_chat_template(prompt))
        return list(prompt)

    def add_request(self, prompt: Prompt, sampling: SamplingParams | None = None, *,
                    request_id: str | None = None, priority: int = 0,
                    adapter_id: str | None = None) -> str:
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if adapter_id:
            self._check_adapter(adapter_id)
        self.core.add_request(rid, self.encode_prompt(prompt), sampling or SamplingParams(),
                              priority=priority, adapter_id=adapter_id)
        return rid

    # ---- LoRA adapters ---------------------------------------------------------------------
    def _check_adapter(self, name: str) -> None:
        """UnknownAdapterError / InvalidAdapterError before anything is queued; reads the adapter into
        the host cache now, so the step that first uses it only copies it into a slot."""
        lora = self.runner.lora
        if lora is None:
            raise UnknownAdapterError(f"adapter {name!r}: this engine serves no adapters (max_loras=0)")
        lora.prefetch(name)

    def load_adapter(self, name: str, path: str) -> int:
        """Register a PEFT LoRA folder under `name` and load it into a slot (validating it); returns the slot."""
        return self.runner.load_adapter(name, path)

    def unload_adapter(self, name: str) -> bool:
        """Forget an adapter; requests already running on it finish, new ones get UnknownAdapterError."""
        return self.runner.unload_adapter(name)

    def adapters(self) -> list[str]:
        return self.runner.adapter_names()

    def step(self) -> list[RequestOutput]:
        return self.core.step()

    def abort(self, request_id: str) -> bool:
        return self.core.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    def stats(self) -> EngineStats:
        return self.core.stats()

    # ---- offline convenience ---------------------------------------------------------------
    def generate(self, prompts: Prompt | list[Prompt], sampling: SamplingParams | list[SamplingParams] | None = None,
                 *, priorities: list[int] | None = None,
                 adapter_ids: list[str | None] | None = None) -> list[CompletionOutput]:
        """Run prompts to completion with continuous batching; outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (int, dict))):
            prompts = [prompts]
        params = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * len(prompts)
        outs: dict[str, CompletionOutput] = {}
        order = []
        for i, p in enumerate(prompts):
            ids = self.encode_prompt(p)
            rid = self.add_request(ids, params[i], priority=priorities[i] if priorities else 0,
                                   adapter_id=adapter_ids[i] if adapter_ids else None)
            outs[rid] = CompletionOutput(rid, ids)
            order.append(rid)
        pending = set(order)
        while pending:
            for o in self.step():
                c = outs.get(o.request_id)
                if c is None:
                    continue
                c.text += o.new_text
                c.token_ids.extend(o.new_token_ids)
                if o.logprobs:
                    c.logprobs = (c.logprobs or []) + o.logprobs
                if o.finished:
                    c.finish_reason = o.finish_reason
                    c.num_cached_tokens = o.num_cached_tokens
                    c.spec_proposed, c.spec_accepted, c.decode_steps = o.spec_proposed, o.spec_accepted, o.decode_steps
                    pending.discard(o.request_id)
        return [outs[r] for r in order]

    @torch.inference_mode()
    def warmup(self) -> None:
        self.generate(["warm up"], SamplingParams(max_tokens=2, temperature=0.0))
