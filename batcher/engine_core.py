"""One engine step: schedule, run, post-process.

EngineCore joins the scheduler (which request runs, in which blocks) to a runner (who executes a
StepPlan) and turns sampled tokens into RequestOutputs: incremental text, stop conditions,
finish reasons and timings. The in-process Engine gives it a local ModelRunner; the batcher
service gives it the worker's `Worker/Step` stream and drives `schedule()`/`process()` itself.
Both build theirs with `build_engine_core` (the KV geometry from the runner, the limits from their
config), so the allocator + scheduler + core assembly exists once.

With speculative decoding a request may get several tokens in one step: they go through the
detokenizer and the stop checks in order, and at a stop the rest of that step's tokens for it are
discarded (the output is truncated there), so outputs are exactly those of one token per step.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from batcher.request import Request, RequestStatus
from batcher.scheduler import QueueFullError, Scheduler, SchedulerStats  # noqa: F401 (re-export)
from batcher.spec_policy import SpecCounters, SpecPolicy
from kv_manager.block_allocator import BlockAllocator
from kv_manager.events import KvEvent
from workers.engine.detokenizer import IncrementalDetokenizer
from workers.engine.errors import InvalidRequestError
from workers.engine.plan import StepPlan, StepResult
from workers.engine.sampling_params import SamplingParams


class StepRunner(Protocol):
    def execute(self, plan: StepPlan) -> StepResult: ...


class SchedulerLimits(Protocol):
    """The scheduling settings both EngineConfig (in-process) and StackConfig (the batcher) carry."""
    enable_prefix_caching: bool
    max_num_seqs: int
    max_num_batched_tokens: int
    max_waiting: int
    max_loras: int


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None            # "stop" | "length" | "abort"
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    logprobs: list[float] | None = None
    queue_ms: float = 0.0                # set on the finishing output
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    spec_proposed: int = 0               # set on the finishing output: drafts verified, accepted, and the
    spec_accepted: int = 0               # request's decode steps (Usage.spec_proposed_tokens, ...)
    decode_steps: int = 0


@dataclass
class EngineStats(SchedulerStats):
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    steps_total: int = 0
    spec_proposed_total: int = 0         # speculation, all methods (per method: EngineCore.spec_totals())
    spec_accepted_total: int = 0


class EngineCore:
    def __init__(self, scheduler: Scheduler, runner: StepRunner | None, tokenizer, *,
                 eos_token_ids: list[int] | None = None, seed: int = 0):
        self.scheduler = scheduler
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids if eos_token_ids is not None else tokenizer.eos_token_ids)
        self._rng = random.Random(seed)
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.steps_total = 0
        # adapter_id -> raises UnknownAdapterError when the worker does not serve it (None: no check)
        self.adapter_check: Callable[[str], None] | None = None
        self._inflight = None           # the launched step whose tokens step() reads next (overlapping runners)

    # ---- requests --------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                    *, priority: int = 0, adapter_id: str | None = None,
                    resume_token_ids: list[int] | None = None, tenant: str = "", tenant_weight: float = 0.0,
                    service_class: str = "", deadline_unix_ms: int = 0) -> None:
        """Validate and queue; raises InvalidRequestError or QueueFullError, queueing nothing.

        `resume_token_ids`: a migrated request's tokens already streamed by another replica. They
        become its first output tokens (as after a recompute preemption: prompt + them is one
        prefill), so max_tokens, the context limit, penalties, the sampler's (seed, position) draw
        and the detokenizer (fed them silently, its stop-string hold included) continue where the
        other replica stopped: the next chunk joins the text the client has without a seam."""
        sampling.validate()
        if not prompt_token_ids:
            raise InvalidRequestError("prompt", "must not be empty")
        if adapter_id and self.adapter_check is not None:
            self.adapter_check(adapter_id)
        if request_id in self.scheduler.requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in flight")
        max_len = self.scheduler.max_model_len
        if len(prompt_token_ids) >= max_len:
            raise InvalidRequestError(
                "prompt", f"{len(prompt_token_ids)} tokens leaves no room to generate within the "
                f"context of {max_len} tokens; shorten it to at most {max_len - 1}")
        resumed = list(resume_token_ids or ())
        if resumed and (len(resumed) >= sampling.max_tokens or len(prompt_token_ids) + len(resumed) >= max_len):
            raise InvalidRequestError(
                "resume_token_ids", f"{len(resumed)} tokens already generated leave nothing to generate "
                f"(max_tokens {sampling.max_tokens}, context {max_len})")
        seed = sampling.seed if sampling.seed is not None else self._rng.getrandbits(63)
        req = Request(request_id=request_id, prompt_token_ids=list(prompt_token_ids),
                      sampling=sampling, seed=seed, priority=priority, adapter_id=adapter_id,
                      output_token_ids=resumed, tenant=tenant, tenant_weight=tenant_weight,
                      service_class=service_class, deadline_unix_ms=deadline_unix_ms)
        self.scheduler.add(req)  # may raise QueueFullError before anything is kept
        detok = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, stop=list(sampling.stop))
        for tok in resumed:   # the text of these is out already: bring the state up to it, emit nothing
            detok.add_token(tok)
        self._detok[request_id] = detok
        self.prompt_tokens_total += len(prompt_token_ids)

    def abort(self, request_id: str) -> bool:
        req = self.scheduler.abort(request_id)
        self._detok.pop(request_id, None)
        return req is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def set_kv_event_callback(self, cb: Callable[[KvEvent], None] | None) -> None:
        self.scheduler.allocator.on_event = cb

    # ---- the step --------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        return self.scheduler.schedule()

    def process(self, result: StepResult) -> list[RequestOutput]:
        self.steps_total += 1
        # the wait predictor's rates and the speculation policy's step cost
        self.scheduler.observe_step(result.step_id, result.execute_ms / 1000, result.draft_ms / 1000,
                                    sum(result.num_drafted))
        sampled = self.scheduler.update(result.request_ids, result.token_ids, result.logprobs,
                                        result.num_emitted, result.num_drafted)
        now = time.perf_counter()
        outputs: list[RequestOutput] = []
        for req, toks in sampled:
            if req.times.first_token is None:
                req.times.first_token = now
            detok = self._detok[req.request_id]
            text, toks, status, stop_hit = self._add_tokens(req, detok, toks)
            self.generation_tokens_total += len(toks)
            if status is not None:
                if not stop_hit:
                    text += detok.flush()
                req.times.finished = now
                self.scheduler.finish(req, status)
                del self._detok[req.request_id]
            outputs.append(self._output(req, toks, text, status))
        return outputs

    def _add_tokens(self, req: Request, detok: IncrementalDetokenizer,
                    toks: list[int]) -> tuple[str, list[int], RequestStatus | None, bool]:
        """A step's tokens for one request (several with speculation), in order; at a stop the rest are
        dropped from the request's output. Returns (text, the tokens kept, finish status, stop string hit)."""
        out = req.output_token_ids
        base = len(out) - len(toks)     # update() appended them all already
        text = ""
        for j, tok in enumerate(toks):
            t, stop_hit = detok.add_token(tok)
            text += t
            status = self._finish_status(req, tok, stop_hit, num_output=base + j + 1)
            if status is not None:
                drop = len(toks) - j - 1
                if drop:
                    del out[-drop:]
                    if req.sampling.logprobs:
                        del req.logprobs[-drop:]
                return text, toks[:j + 1], status, stop_hit
        return text, toks, None, False
    def step(self) -> list[RequestOutput]:
        """One step in process. With a runner that overlaps (CUDA), step N+1 is scheduled, laid out
        and launched while step N runs on the device, and N's tokens are processed while N+1 runs:
        the host work of a step hides behind the device's (the scheduler counts N's tokens as
        pending, as it does for the batcher's pipelined plans)."""
        assert self.runner is not None, "step() needs an in-process runner"
        if not getattr(self.runner, "overlaps", False):
            plan = self.schedule()
            if plan.is_empty and not plan.finished_ids:
                return []
            return self.process(self.runner.execute(plan))
        if self._inflight is None:
            plan = self.schedule()
            if plan.is_empty and not plan.finished_ids:
                return []
            self._inflight = self.runner.launch(plan)
        nxt = None
        if self.scheduler.has_unfinished():
            plan = self.schedule()
            if not plan.is_empty or plan.finished_ids:
                nxt = self.runner.launch(plan)
        result = self._inflight.result()
        self._inflight = nxt
        return self.process(result)

    def _finish_status(self, req: Request, tok: int, stop_hit: bool, num_output: int) -> RequestStatus | None:
        """num_output: the output's length up to and including tok."""
        sp = req.sampling
        if stop_hit:
            return RequestStatus.FINISHED_STOPPED
        if not sp.ignore_eos and tok in self.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if tok in sp.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if num_output >= sp.max_tokens or req.num_prompt_tokens + num_output >= self.scheduler.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    @staticmethod
    def _output(req: Request, toks: list[int], text: str, status: RequestStatus | None) -> RequestOutput:
        out = RequestOutput(
            request_id=req.request_id, new_token_ids=toks, new_text=text,
            finished=status is not None, finish_reason=status.value if status else None,
            num_prompt_tokens=req.num_prompt_tokens, num_output_tokens=len(req.output_token_ids),
            num_cached_tokens=req.num_cached_tokens,
            logprobs=req.logprobs[-len(toks):] if req.sampling.logprobs and req.logprobs else None)
        if status is not None:
            out.queue_ms = req.times.queue_ms()
            out.prefill_ms = req.times.prefill_ms()
            out.decode_ms = req.times.decode_ms()
            out.spec_proposed = req.spec_proposed
            out.spec_accepted = req.spec_accepted
            out.decode_steps = req.num_decode_steps
        return out

    def spec_totals(self) -> dict[str, SpecCounters]:
        """Speculation counters per method since start (proposed, accepted, verify_rows, emitted);
        empty when speculation is off."""
        return self.scheduler.spec_totals()

    def stats(self) -> EngineStats:
        s = self.scheduler.stats()
        totals = self.scheduler.spec_totals().values()
        return EngineStats(**vars(s), prompt_tokens_total=self.prompt_tokens_total,
                           generation_tokens_total=self.generation_tokens_total,
                           steps_total=self.steps_total,
                           spec_proposed_total=sum(c.proposed for c in totals),
                           spec_accepted_total=sum(c.accepted for c in totals))


def build_engine_core(limits: SchedulerLimits, *, num_blocks: int, block_size: int, max_model_len: int,
                      runner: StepRunner | None, tokenizer, eos_token_ids: list[int] | None = None,
                      seed: int = 0) -> EngineCore:
    """Allocator (sized from the runner's KV cache) + scheduler (limits from the config) + EngineCore.
    `runner` None: the caller drives schedule()/process() itself (the batcher service)."""
    allocator = BlockAllocator(num_blocks, block_size, enable_prefix_caching=limits.enable_prefix_caching)
    method = getattr(limits, "speculative_method", "off") or "off"
    spec = None
    if method != "off":
        spec = SpecPolicy(method, getattr(limits, "num_speculative_tokens", 4),
                          getattr(limits, "speculative_adaptive", True))
    scheduler = Scheduler(allocator, max_num_seqs=limits.max_num_seqs,
                          max_num_batched_tokens=limits.max_num_batched_tokens, max_model_len=max_model_len,
                          max_waiting=limits.max_waiting, max_loras=limits.max_loras, spec=spec)
    return EngineCore(scheduler, runner, tokenizer, eos_token_ids=eos_token_ids, seed=seed)
