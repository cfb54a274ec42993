"""Continuous-batching scheduler: who runs this step, with how many tokens, in which KV blocks.

One step is planned under a token budget: running requests first (decodes and the next chunk of
a chunked prefill), then waiting requests in priority order (higher first, FIFO within a class),
each admitted with its prefix-cache hit and as much of its prompt as the budget leaves. When
the allocator cannot supply a block, the lowest-priority, newest running request is preempted
(its blocks freed, its tokens recomputed later), so a step never runs out of KV memory.
The scheduler only decides; the worker executes the resulting StepPlan.
"""
from __future__ import annotations

import bisect
import heapq
import time
from dataclasses import dataclass, field

from batcher.request import Request, RequestStatus
from kv_manager.block_allocator import BlockAllocator
from kv_manager.block_hash import block_hashes
from workers.engine.errors import QueueFullError
from workers.engine.plan import NewRequestPlan, RunningRequestPlan, StepPlan


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_usage: float
    num_free_blocks: int
    num_blocks: int
    prefix_cache_hit_rate: float
    num_preemptions: int


@dataclass
class _Scheduled:
    request: Request
    num_new_tokens: int
    new_block_ids: list[int] = field(default_factory=list)


def _order_key(r: Request) -> tuple[int, int]:
    return (-r.priority, r.arrival_seq)


class Scheduler:
    def __init__(self, allocator: BlockAllocator, *, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 512, max_model_len: int = 2048,
                 max_waiting: int = 1024, max_loras: int | None = None):
        self.allocator = allocator
        self.max_loras = max_loras      # distinct LoRA adapters among running requests (worker slots)
        self.block_size = allocator.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.max_waiting = max_waiting
        self.requests: dict[str, Request] = {}
        self._waiting: list[tuple[int, int, Request]] = []   # heap of (-priority, arrival_seq, req)
        self.running: list[Request] = []                     # sorted by _order_key
        self._next_seq = 0
        self._step_id = 0
        self._worker_forget: list[str] = []                  # ids the worker must drop next step
        self.num_preemptions = 0
        self._prefix_queried_tokens = 0
        self._prefix_hit_tokens = 0

    # ---- admission -------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def add(self, req: Request) -> None:
        if len(self._waiting) >= self.max_waiting:
            raise QueueFullError(
                f"waiting queue is full ({self.max_waiting} requests); retry later",
                retry_after_ms=self._retry_after_ms())
        req.arrival_seq = self._next_seq
        self._next_seq += 1
        req.status = RequestStatus.WAITING
        self._extend_hashes(req)
        self.requests[req.request_id] = req
        heapq.heappush(self._waiting, (-req.priority, req.arrival_seq, req))

    def _retry_after_ms(self) -> int:
        # Rough drain time of the queue ahead: ~100 ms per batch-worth of waiting requests.
        return 100 * (1 + len(self._waiting) // max(1, self.max_num_seqs))

    def has_unfinished(self) -> bool:
        return bool(self._waiting) or bool(self.running)

    # ---- finishing -------------------------------------------------------------------------
    def finish(self, req: Request, status: RequestStatus) -> None:
        """Retire a request: free its blocks and tell the worker to forget it."""
        if req.finished:
            return
        if req.status == RequestStatus.RUNNING:
            i = self._index_in_running(req)
            if i is not None:
                self.running.pop(i)
        else:
            self._waiting = [e for e in self._waiting if e[2] is not req]
            heapq.heapify(self._waiting)
        req.status = status
        self._release(req)
        self.requests.pop(req.request_id, None)

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is None:
            return None
        self.finish(req, RequestStatus.FINISHED_ABORTED)
        return req

    def _release(self, req: Request) -> None:
        if req.block_ids:
            self.allocator.free(req.block_ids)
        req.block_ids = []
        req.num_cached_blocks = 0
        if req.sent_to_worker:
            self._worker_forget.append(req.request_id)
            req.sent_to_worker = False

    def _index_in_running(self, req: Request) -> int | None:
        key = _order_key(req)
        i = bisect.bisect_left(self.running, key, key=_order_key)
        while i < len(self.running) and _order_key(self.running[i]) == key:
            if self.running[i] is req:
                return i
            i += 1
        return None

    # ---- planning --------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        budget = self.max_num_batched_tokens
        scheduled: dict[str, _Scheduled] = {}
        preempted_any = False

        # 1. Running requests, highest priority first.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens + req.num_pending - req.num_computed_tokens, budget)
            if n <= 0 or (req.num_pending and self._done_when_pending_lands(req)):
                i += 1
                continue
            new_blocks = self._grow(req, n)
            while new_blocks is None:
                victim = self.running[-1]
                self._preempt(victim, scheduled)
                preempted_any = True
                if victim is req:
                    break
                new_blocks = self._grow(req, n)
            if new_blocks is None:      # req itself was preempted; it was the last one
                break
            scheduled[req.request_id] = _Scheduled(req, n, new_blocks)
            budget -= n
            i += 1

        # 2. Waiting requests, unless this step already had to preempt (memory is tight).
        while self._waiting and budget > 0 and not preempted_any:
            req = self._waiting[0][2]
            if req.num_pending:
                break                   # preempted with a token in flight: recompute once it has landed
            if len(self.running) >= self.max_num_seqs:
                if not self._preempt_lower_than(req, scheduled):
                    break
                budget = self.max_num_batched_tokens - sum(s.num_new_tokens for s in scheduled.values())
                continue
            if req.adapter_id and self.max_loras and not self._adapter_fits(req.adapter_id):
                break                   # every adapter slot is held by running requests: wait for one
            admitted = self._admit(req, budget)
            if admitted is None:
                if not self._preempt_lower_than(req, scheduled):
                    break
                budget = self.max_num_batched_tokens - sum(s.num_new_tokens for s in scheduled.values())
                continue
            heapq.heappop(self._waiting)
            scheduled[req.request_id] = admitted
            budget -= admitted.num_new_tokens

        return self._make_plan(scheduled)

    def _done_when_pending_lands(self, req: Request) -> bool:
        """Whether the tokens in flight already reach max_tokens / the context: no step past them."""
        n_out = len(req.output_token_ids) + req.num_pending
        return n_out >= req.sampling.max_tokens or req.num_tokens + req.num_pending >= self.max_model_len

    def _adapter_fits(self, adapter_id: str) -> bool:
        running = {r.adapter_id for r in self.running if r.adapter_id}
        return adapter_id in running or len(running) < self.max_loras

    def _grow(self, req: Request, n: int) -> list[int] | None:
        """Blocks needed to hold req's next n tokens; None when the allocator is out."""
        need = -(-(req.num_computed_tokens + n) // self.block_size) - len(req.block_ids)
        if need <= 0:
            return []
        fresh = self.allocator.allocate(need)
        if fresh is not None:
            req.block_ids.extend(fresh)
        return fresh

    def _admit(self, req: Request, budget: int) -> _Scheduled | None:
        bs = self.block_size
        # At least the last token is computed, for its logits: never match the block holding it.
        max_hit_blocks = (req.num_tokens - 1) // bs
        cached = self.allocator.match_prefix(req.block_hashes[:max_hit_blocks])
        num_computed = len(cached) * bs
        n = min(req.num_tokens - num_computed, budget)
        need = -(-(num_computed + n) // bs) - len(cached)
        fresh = self.allocator.allocate(need, prefix_block_ids=cached)
        if fresh is None:
            return None
        req.block_ids = list(cached) + fresh
        req.num_cached_blocks = len(cached)
        req.num_computed_tokens = num_computed
        req.status = RequestStatus.RUNNING
        if req.times.first_scheduled is None:
            req.times.first_scheduled = _now()
            req.num_cached_tokens = num_computed
            self._prefix_queried_tokens += req.num_prompt_tokens
            self._prefix_hit_tokens += num_computed
        bisect.insort(self.running, req, key=_order_key)
        return _Scheduled(req, n, req.block_ids)

    def _preempt(self, victim: Request, scheduled: dict[str, _Scheduled]) -> None:
        """Recompute-preemption: free victim's blocks and put it back at the head of its class."""
        self.running.remove(victim)
        scheduled.pop(victim.request_id, None)
        self._release(victim)
        victim.num_computed_tokens = 0
        victim.status = RequestStatus.WAITING
        victim.num_preemptions += 1
        self.num_preemptions += 1
        heapq.heappush(self._waiting, (-victim.priority, victim.arrival_seq, victim))

    def _preempt_lower_than(self, req: Request, scheduled: dict[str, _Scheduled]) -> bool:
        """Make room for a waiting request by preempting a strictly lower-priority running one."""
        if not self.running or self.running[-1].priority >= req.priority:
            return False
        self._preempt(self.running[-1], scheduled)
        return True

    def _make_plan(self, scheduled: dict[str, _Scheduled]) -> StepPlan:
        self._step_id += 1
        plan = StepPlan(step_id=self._step_id, finished_ids=self._worker_forget)
        self._worker_forget = []
        for s in scheduled.values():
            r = s.request
            # Advance now, not when the result lands, so the next step can be planned while this
            # one runs (the batcher keeps one plan queued at the worker). A chunk that reaches the
            # end of the sequence samples a token nobody knows yet: count it as pending.
            r.num_computed_tokens += s.num_new_tokens
            if r.num_computed_tokens == r.num_tokens + r.num_pending:
                r.num_pending += 1
            if r.sent_to_worker:
                plan.running.append(RunningRequestPlan(r.request_id, s.num_new_tokens, s.new_block_ids))
            else:
                plan.new_requests.append(NewRequestPlan(
                    request_id=r.request_id, token_ids=r.all_token_ids,
                    num_prompt_tokens=r.num_prompt_tokens,
                    num_computed_tokens=r.num_computed_tokens - s.num_new_tokens, num_new_tokens=s.num_new_tokens,
                    block_ids=list(r.block_ids), sampling=r.sampling, seed=r.seed,
                    adapter_id=r.adapter_id))
                r.sent_to_worker = True
        return plan

    # ---- after the worker ran the plan ------------------------------------------------------
    def update(self, request_ids: list[str], token_ids: list[int],
               logprobs: list[float] | None) -> list[tuple[Request, int]]:
        """Append the oldest step in flight's sampled tokens; cache newly full blocks.

        A token for a request that finished meanwhile (stop found in an earlier result while this
        step ran) is dropped. One for a request preempted meanwhile is kept: it was sampled from
        valid KV, and the recompute starts after it."""
        sampled: list[tuple[Request, int]] = []
        for k, (rid, tok) in enumerate(zip(request_ids, token_ids)):
            r = self.requests.get(rid)
            if r is None or r.finished:
                continue
            r.num_pending -= 1
            r.output_token_ids.append(tok)
            if logprobs is not None:
                r.logprobs.append(logprobs[k])
            sampled.append((r, tok))
        bs = self.block_size
        for r in self.running:
            if r.num_computed_tokens // bs > r.num_cached_blocks:    # a block filled: cache it (cheap test first)
                self._cache_full_blocks(r)
        return sampled

    def _extend_hashes(self, req: Request) -> None:
        full = req.num_tokens // self.block_size
        have = len(req.block_hashes)
        if full > have:
            toks = req.all_token_ids[have * self.block_size: full * self.block_size]
            parent = req.block_hashes[-1] if have else None
            req.block_hashes.extend(block_hashes(toks, self.block_size, req.adapter_id, parent_hash=parent))

    def _cache_full_blocks(self, req: Request) -> None:
        full = min(req.num_computed_tokens // self.block_size, len(req.block_ids))
        if full <= req.num_cached_blocks:
            return
        self._extend_hashes(req)
        bs = self.block_size
        toks = req.all_token_ids
        for b in range(req.num_cached_blocks, full):
            parent = req.block_hashes[b - 1] if b else None
            self.allocator.cache_block(req.block_ids[b], req.block_hashes[b], parent,
                                       toks[b * bs:(b + 1) * bs], req.adapter_id)
        req.num_cached_blocks = full

    # ---- introspection ---------------------------------------------------------------------
    def stats(self) -> SchedulerStats:
        a = self.allocator
        hit = self._prefix_hit_tokens / self._prefix_queried_tokens if self._prefix_queried_tokens else 0.0
        return SchedulerStats(
            num_running=len(self.running), num_waiting=len(self._waiting), kv_usage=a.usage,
            num_free_blocks=a.num_free_blocks, num_blocks=a.num_blocks,
            prefix_cache_hit_rate=hit, num_preemptions=self.num_preemptions)


def _now() -> float:
    return time.perf_counter()
