"""Continuous-batching scheduler: who runs this step, with how many tokens, in which KV blocks.

One step is planned under a token budget, one service class at a time: `interactive` first (running
requests' decodes and prefill chunks, then waiting ones), then `batch` with what is left, so a bulk
job only fills idle capacity and an interactive arrival waits at most the step in flight (it may
preempt batch requests for a seat or blocks). Among tenants, waiting requests are admitted by fair
share in tokens (the Virtual Token Counter of Sheng et al., OSDI'24): each tenant's counter grows
by the prefill and decode tokens scheduled for it divided by its weight, the backlogged tenant with
the smallest counter is admitted next, and a tenant that becomes active is lifted to the smallest
counter of the active ones (or to the last one that went idle), so idling banks no credit. Within a
tenant: priority (higher first), then FIFO. When the allocator cannot supply a block a running
request is preempted by recompute: batch class first, then the tenant furthest above its share, its
lowest-priority newest request. So a step never runs out of KV memory, and preemption never picks a
tenant below its fair share while one above it runs.

Admission is honest (`add`): the queue bound counts only requests that will not get a seat at the
next step, and an interactive request whose predicted wait for a first token
(batcher/step_timing.py WaitPredictor: measured prefill rate, decode step time, the queue ahead)
exceeds its deadline or `max_queue_delay_s` is refused at once, with a retry-after from the measured
drain rate. Waiting requests past their deadline are dropped (`expired_waiting`, `drop_expired`).
The scheduler only decides; the worker executes the resulting StepPlan.

Speculative decoding (batcher/spec_policy.py decides who and how many): a request in decode state
whose policy says so gets a row of 1 + k query slots (`num_spec_tokens`, model-free drafts in
`draft_token_ids`), blocks for all of them and a budget charge of 1 + k; only its decode token counts
as computed until the result lands. Until then it is not planned again (`spec_inflight`). Its result
(1..k+1 tokens) advances it to its known tokens but the last and trims its blocks to what they cover:
the rejected drafts' slots go back to the allocator (the worker trims its row by the same rule).
"""
from __future__ import annotations

import bisect
import heapq
import time
from dataclasses import dataclass, field

from batcher.request import Request, RequestStatus
from batcher.spec_policy import SpecCounters, SpecPolicy
from batcher.step_timing import WaitPredictor
from common.wait_limit import wait_limit
from kv_manager.block_allocator import BlockAllocator
from kv_manager.block_hash import block_hashes
from workers.engine.errors import InvalidRequestError, QueueFullError
from workers.engine.plan import NewRequestPlan, RunningRequestPlan, StepPlan

INTERACTIVE = "interactive"
BATCH = "batch"
SERVICE_CLASSES = (INTERACTIVE, BATCH)   # their order is their rank: interactive is served first
DEFAULT_TENANT = "default"
_RANK = {c: i for i, c in enumerate(SERVICE_CLASSES)}
_STEPS_REMEMBERED = 8                    # plans whose prefill/decode split awaits its measured time
# arrivals the admission forecast predicts for (Heartbeat.forecast_arrivals), with the seat-round edges
# Scheduler.forecast adds: dense where the first cohort fills the seats, sparse beyond
FORECAST_ARRIVALS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
HOPELESS_EVERY_S = 0.25                  # how often waiting requests' first tokens are predicted again


@dataclass
class TenantTokens:
    """What a tenant was served on this worker: tokens actually scheduled, and its fair-share state."""
    prefill_tokens: int = 0
    decode_tokens: int = 0
    counter: float = 0.0        # virtual token counter: weighted tokens (tokens / weight)
    weight: float = 1.0
    waiting: int = 0
    running: int = 0


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_usage: float
    num_free_blocks: int
    num_blocks: int
    prefix_cache_hit_rate: float
    num_preemptions: int
    num_deadline_drops: int = 0
    tenants: dict[str, TenantTokens] = field(default_factory=dict)   # Scheduler.tenant_tokens()


@dataclass
class _Scheduled:
    request: Request
    num_new_tokens: int
    new_block_ids: list[int] = field(default_factory=list)
    num_spec_tokens: int = 0
    draft_token_ids: list[int] = field(default_factory=list)


def _order_key(r: Request) -> tuple[int, int, int]:
    return (_RANK[r.service_class], -r.priority, r.arrival_seq)


def normalize_request(req: Request) -> None:
    """The wire's empty values mean the defaults: tenant "default", weight 1, class interactive."""
    req.tenant = req.tenant or DEFAULT_TENANT
    if not req.tenant_weight or req.tenant_weight <= 0:
        req.tenant_weight = 1.0
    cls = (req.service_class or INTERACTIVE).strip().lower()
    if cls not in _RANK:
        raise InvalidRequestError("service_class", f"{req.service_class!r} is not one of {', '.join(SERVICE_CLASSES)}")
    req.service_class = cls


class Scheduler:
    def __init__(self, allocator: BlockAllocator, *, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 512, max_model_len: int = 2048,
                 max_waiting: int = 1024, max_loras: int | None = None,
                 max_queue_delay_s: float = 0.0, predictor: WaitPredictor | None = None,
                 wall_clock=time.time, spec: SpecPolicy | None = None):
        self.allocator = allocator
        self.max_loras = max_loras      # distinct LoRA adapters among running requests (worker slots)
        self.block_size = allocator.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.max_waiting = max_waiting  # requests waiting beyond the free seats, per class
        self.max_queue_delay_s = max_queue_delay_s   # 0: only deadlines bound the predicted wait
        self.predictor = predictor if predictor is not None else WaitPredictor()
        self.wall_clock = wall_clock    # unix seconds: deadlines travel as unix ms
        self.spec = spec                # speculative decoding policy (None: off)
        self.requests: dict[str, Request] = {}
        # (class rank, tenant) -> heap of (-priority, arrival_seq, queued tokens, req); non-empty only
        self._queues: dict[tuple[int, str], list[tuple[int, int, int, Request]]] = {}
        self._waiting_count = [0] * len(SERVICE_CLASSES)    # per class rank
        self._waiting_tokens = [0] * len(SERVICE_CLASSES)   # prompt work queued, per class rank
        self._deadlines: list[tuple[int, int, Request]] = []  # heap; stale entries skipped
        self.running: list[Request] = []                     # sorted by _order_key
        self._tenants: dict[str, TenantTokens] = {}
        self._vtc_floor = 0.0           # counter of the last tenant that went idle
        self._next_seq = 0
        self._step_id = 0
        # step id -> (prefill tokens, decode rows, prompt chunk tokens); verification slots count as prefill
        self._step_work: dict[int, tuple[int, int, int]] = {}
        self._worker_forget: list[str] = []                  # ids the worker must drop next step
        self._preempted_now: set[str] = set()                # preempted while planning this step
        self.num_preemptions = 0
        self.num_deadline_drops = 0
        self._prefix_queried_tokens = 0
        self._prefix_hit_tokens = 0
        self._hopeless_next = 0.0       # wall clock of the next hopeless_waiting pass

    # ---- admission -------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return sum(self._waiting_count)

    def add(self, req: Request) -> None:
        """Queue a request, or raise QueueFullError (nothing kept): its class's queue beyond the free
        seats is at `max_waiting`, or (interactive) its predicted wait for a first token exceeds
        its deadline or `max_queue_delay_s`."""
        normalize_request(req)
        self._check_admission(req)
        req.arrival_seq = self._next_seq
        self._next_seq += 1
        self._extend_hashes(req)
        self.requests[req.request_id] = req
        t = self._tenant(req.tenant)
        t.weight = req.tenant_weight
        if not t.waiting and not t.running:   # becomes active: no credit banked while idle
            active = [o.counter for o in self._tenants.values() if (o.waiting or o.running) and o is not t]
            t.counter = max(t.counter, min(active) if active else self._vtc_floor)
        self._push_waiting(req)
        if req.deadline_unix_ms:
            if len(self._deadlines) > 2 * len(self.requests) + 64:   # mostly requests long gone: prune
                self._deadlines = [e for e in self._deadlines if self.requests.get(e[2].request_id) is e[2]]
                heapq.heapify(self._deadlines)
            heapq.heappush(self._deadlines, (req.deadline_unix_ms, req.arrival_seq, req))

    def _queue_ahead(self, rank: int) -> tuple[int, int, int]:
        """(requests waiting ahead, seats free, prompt tokens waiting ahead) for an arrival of class `rank`:
        batch waits behind interactive too, and batch requests give their seats up to interactive ones."""
        ahead = sum(self._waiting_count[:rank + 1])
        seated = len(self.running) if rank else bisect.bisect_left(self.running, (1,), key=_order_key)
        return ahead, max(0, self.max_num_seqs - seated), sum(self._waiting_tokens[:rank + 1])

    def _check_admission(self, req: Request) -> None:
        rank = _RANK[req.service_class]
        ahead, free, tokens_ahead = self._queue_ahead(rank)
        budget = self.max_num_batched_tokens
        p = self.predictor
        p.note_arrival(req.num_tokens)
        wait = p.queue_wait_s(tokens_ahead=tokens_ahead, requests_ahead=ahead, free_seats=free, budget=budget)
        if ahead - free >= self.max_waiting:
            raise QueueFullError(
                f"waiting queue is full ({self.max_waiting} requests beyond the {self.max_num_seqs} "
                f"seats); retry later", retry_after_ms=self._retry_after_ms(ahead, wait or 0.1 * (1 + ahead)))
        if req.service_class != INTERACTIVE or (ahead == 0 and free > 0):
            return   # nothing ahead of it: its wait is its own prefill
        if wait is None:
            return   # nothing measured yet: the queue bound alone
        first_token = wait + p.prefill_s(req.num_tokens, budget)
        limit, what = self._wait_limit(req)
        if limit and limit > 0 and first_token > limit:
            raise QueueFullError(
                f"predicted wait for a first token {1000 * first_token:.0f} ms exceeds {what} "
                f"({1000 * limit:.0f} ms): {ahead} request(s) queued ahead; retry later",
                retry_after_ms=self._retry_after_ms(ahead, wait))

    def _wait_limit(self, req: Request) -> tuple[float, str]:
        """(seconds, name) an interactive request may wait for its first token (common/wait_limit.py)."""
        left = req.deadline_unix_ms / 1000 - self.wall_clock() if req.deadline_unix_ms else None
        return wait_limit(left, self.max_queue_delay_s)

    def forecast(self) -> tuple[list[int], list[float], int]:
        """What the router's admission gate needs (router/admission_gate.py, Heartbeat.forecast_*):
        arrivals n, the predicted seconds to a first token of the n-th interactive request arriving now
        (each bringing the mean recent prompt; 0 where nothing would be ahead of it and a seat is free,
        as `add` admits those unconditionally), and how many arrivals the queue bound still takes.
        The arrivals are FORECAST_ARRIVALS plus both sides of every point where a whole round of seats
        must turn over first (there the wait jumps by a generation; the router interpolates linearly).
        ([], [], room) before anything is measured."""
        ahead, free, tokens_ahead = self._queue_ahead(0)
        room = max(0, self.max_waiting - (ahead - free))
        p = self.predictor
        budget = self.max_num_batched_tokens
        if not p.measured:
            return [], [], room
        last = FORECAST_ARRIVALS[-1]
        # arrival n needs the (ahead + n - free)-th seat opening: jumps after free - ahead + k * seats
        edge, seats = free - ahead, max(1, self.max_num_seqs)
        while edge < 0:
            edge += seats
        steps = {n for e in range(edge, last + 1, seats) for n in (e, e + 1)}
        arrivals = sorted(n for n in set(FORECAST_ARRIVALS) | steps if 1 <= n <= last)
        mean = p.mean_prompt_tokens
        own = p.prefill_s(round(mean), budget)
        waits = []
        for n in arrivals:
            before = ahead + n - 1
            if before == 0 and free > 0:
                waits.append(0.0)
                continue
            wait = p.queue_wait_s(tokens_ahead=tokens_ahead + round((n - 1) * mean), requests_ahead=before,
                                  free_seats=free, budget=budget)
            waits.append(wait + own)
        return arrivals, waits, room

    def hopeless_waiting(self) -> list[tuple[Request, int]]:
        """Interactive requests still waiting whose first token, predicted again from where they stand in
        the queue and the rates measured since they arrived, comes after their deadline: (request,
        retry-after ms) for the caller to refuse (RESOURCE_EXHAUSTED) and abort. A refusal now beats a
        silent wait that ends in DEADLINE_EXCEEDED: the client can go elsewhere while it still has time.
        At most every `HOPELESS_EVERY_S`; the queue is walked in priority-then-arrival order (the fair
        share across tenants may admit a little differently)."""
        now = self.wall_clock()
        if now < self._hopeless_next or not self._waiting_count[0] or not self.predictor.measured:
            return []
        self._hopeless_next = now + HOPELESS_EVERY_S
        p = self.predictor
        budget = self.max_num_batched_tokens
        _, free, _ = self._queue_ahead(0)
        queued = sorted((e for key, q in self._queues.items() if key[0] == 0 for e in q), key=lambda e: e[:2])
        hopeless: list[tuple[Request, int]] = []
        tokens_ahead = 0
        for ahead, (_, _, tokens, req) in enumerate(queued):
            if req.deadline_unix_ms:
                wait = p.queue_wait_s(tokens_ahead=tokens_ahead, requests_ahead=ahead, free_seats=free,
                                      budget=budget)
                if wait + p.prefill_s(tokens, budget) > req.deadline_unix_ms / 1000 - now:
                    hopeless.append((req, self._retry_after_ms(ahead, wait)))
            tokens_ahead += tokens
        return hopeless

    def _retry_after_ms(self, ahead: int, fallback_s: float) -> int:
        """The time the queue ahead takes to drain at the measured rate."""
        return max(1, round(1000 * self.predictor.retry_after_s(ahead, fallback_s)))

    def _tenant(self, name: str) -> TenantTokens:
        t = self._tenants.get(name)
        if t is None:
            t = self._tenants[name] = TenantTokens()
        return t

    def _push_waiting(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        rank = _RANK[req.service_class]
        key = (rank, req.tenant)
        tokens = req.num_tokens
        heapq.heappush(self._queues.setdefault(key, []), (-req.priority, req.arrival_seq, tokens, req))
        self._waiting_count[rank] += 1
        self._waiting_tokens[rank] += tokens
        self._tenants[req.tenant].waiting += 1

    def _pop_waiting(self, key: tuple[int, str]) -> Request:
        q = self._queues[key]
        _, _, tokens, req = heapq.heappop(q)
        if not q:
            del self._queues[key]
        self._waiting_count[key[0]] -= 1
        self._waiting_tokens[key[0]] -= tokens
        self._tenants[req.tenant].waiting -= 1
        return req

    def _remove_waiting(self, req: Request) -> None:
        key = (_RANK[req.service_class], req.tenant)
        q = self._queues.get(key, [])
        for i, e in enumerate(q):
            if e[3] is req:
                q[i] = q[-1]
                q.pop()
                heapq.heapify(q)
                if not q:
                    del self._queues[key]
                self._waiting_count[key[0]] -= 1
                self._waiting_tokens[key[0]] -= e[2]
                self._tenants[req.tenant].waiting -= 1
                return

    def _next_waiting(self, rank: int) -> tuple[int, str] | None:
        """The queue to admit from: the backlogged tenant with the smallest counter (ties: FIFO)."""
        best = None
        best_key = None
        for key, q in self._queues.items():
            if key[0] != rank:
                continue
            k = (self._tenants[key[1]].counter, q[0][1])
            if best is None or k < best:
                best, best_key = k, key
        return best_key

    def has_unfinished(self) -> bool:
        return bool(self._queues) or bool(self.running)

    # ---- finishing -------------------------------------------------------------------------
    def finish(self, req: Request, status: RequestStatus) -> None:
        """Retire a request: free its blocks and tell the worker to forget it."""
        if req.finished:
            return
        t = self._tenants.get(req.tenant)
        if req.status == RequestStatus.RUNNING:
            i = self._index_in_running(req)
            if i is not None:
                self.running.pop(i)
                t.running -= 1
                self.predictor.note_finished()
        else:
            self._remove_waiting(req)
        req.status = status
        if self.spec is not None and status != RequestStatus.FINISHED_ABORTED:
            self.spec.on_finish(req)
        self._release(req)
        self.requests.pop(req.request_id, None)
        if not self.running and not self._queues:
            self.predictor.note_idle()
        if t is not None and not t.waiting and not t.running:
            self._vtc_floor = t.counter       # the last tenant to go idle (VTC's lift for the next)

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is None:
            return None
        self.finish(req, RequestStatus.FINISHED_ABORTED)
        return req

    def expired_waiting(self) -> list[Request]:
        """Waiting requests whose deadline has passed, for the caller to answer (DEADLINE_EXCEEDED) and
        abort. Cheap when none expired: one look at a heap."""
        dl = self._deadlines
        if not dl:
            return []
        now_ms = self.wall_clock() * 1000
        expired: list[Request] = []
        while dl and dl[0][0] <= now_ms:
            _, _, req = heapq.heappop(dl)
            # (a preempted request has a second entry: take it once)
            if req.status == RequestStatus.WAITING and self.requests.get(req.request_id) is req \
                    and not any(e is req for e in expired):
                expired.append(req)
        self.num_deadline_drops += len(expired)
        return expired

    def drop_expired(self) -> list[Request]:
        """`expired_waiting`, retired at once (nothing of theirs is kept)."""
        expired = self.expired_waiting()
        for req in expired:
            self.finish(req, RequestStatus.FINISHED_ABORTED)
        return expired

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
        scheduled: dict[str, _Scheduled] = {}
        budget = [self.max_num_batched_tokens]
        preempted = [False]
        self._preempted_now.clear()
        if self.spec is not None:
            # A plan made while an earlier one has not returned runs after it (the step pipeline).
            rows = sum(1 for r in self.running if r.num_computed_tokens >= r.num_prompt_tokens)
            self.spec.begin_step(rows, pipelined=bool(self._step_work))
        for rank in range(len(SERVICE_CLASSES)):
            chunks = self._schedule_decodes(rank, scheduled, budget, preempted)
            self._schedule_prefills(rank, chunks, scheduled, budget, preempted)
        return self._make_plan(scheduled)

    def _schedule_decodes(self, rank: int, scheduled: dict[str, _Scheduled], budget: list[int],
                          preempted: list[bool]) -> list[Request]:
        """This class's running requests that need one token (decodes), highest priority first; returns
        those that need more (prefill chunks), which compete with admissions by fair share."""
        chunks: list[Request] = []
        mine = [r for r in self.running if _RANK[r.service_class] == rank]
        for i, req in enumerate(mine):
            if budget[0] <= 0:
                break
            if req.status != RequestStatus.RUNNING:
                continue                # preempted for an earlier one this step
            n = req.num_tokens + req.num_pending - req.num_computed_tokens
            if n <= 0 or (req.num_pending and self._done_when_pending_lands(req)):
                continue
            if n > 1:
                chunks.append(req)
                continue
            if req.spec_inflight:
                continue                # its verification result decides where it stands
            k, drafts = 0, []
            if self.spec is not None:
                if req.num_pending:
                    if self.spec.wants_pending(req):
                        continue        # speculating: plan it in decode state next step (spec_policy.py)
                elif req.sent_to_worker:
                    # draft slots never crowd out a token for the requests after it
                    k, drafts = self.spec.plan(req, self._spec_cap(req, budget[0] - (len(mine) - i - 1)))
            self._schedule_running(req, 1, scheduled, budget, preempted, k, drafts)
        return chunks

    def _spec_cap(self, req: Request, budget: int) -> int:
        """The most drafts req may verify: never past max_tokens or the context, within the budget."""
        return min(req.sampling.max_tokens - len(req.output_token_ids) - 1,
                   self.max_model_len - req.num_tokens - 1, budget - 1)

    def _schedule_prefills(self, rank: int, chunks: list[Request], scheduled: dict[str, _Scheduled],
                           budget: list[int], preempted: list[bool]) -> None:
        """Running prefill chunks and admissions of waiting requests, lowest tenant counter first (a
        tie goes to the chunk: finish what has started). Charging as they are planned keeps a long
        prompt's chunks from taking the budget step after step while other tenants wait. Waiting
        requests are not admitted once this step had to preempt for memory (it is tight)."""
        admit = True
        counters = self._tenants
        while budget[0] > 0:
            best, best_key = None, None
            for r in chunks:
                if r.status == RequestStatus.RUNNING and r.request_id not in scheduled:
                    k = (counters[r.tenant].counter, 0, -r.priority, r.arrival_seq)
                    if best_key is None or k < best_key:
                        best, best_key = r, k
            queue = self._next_waiting(rank) if admit and not preempted[0] else None
            if queue is not None:
                head = self._queues[queue][0]
                k = (counters[queue[1]].counter, 1, head[0], head[1])
                if best_key is None or k < best_key:
                    if not self._admit_next(queue, scheduled, budget):
                        admit = False
                    continue
            if best is None:
                return
            n = best.num_tokens + best.num_pending - best.num_computed_tokens
            self._schedule_running(best, min(n, budget[0]), scheduled, budget, preempted)
            chunks.remove(best)

    def _schedule_running(self, req: Request, n: int, scheduled: dict[str, _Scheduled], budget: list[int],
                          preempted: list[bool], k: int = 0, drafts: list[int] | None = None) -> None:
        """Blocks for a running request's next n tokens (+ k draft slots), preempting (see _victim)
        while the allocator is out; req itself may be the one preempted. Draft slots never preempt:
        without blocks for them it is a plain decode."""
        if k:
            new_blocks = self._grow(req, n + k)
            if new_blocks is not None:
                scheduled[req.request_id] = _Scheduled(req, n, new_blocks, k, drafts or [])
                self._charge(req, n + k)
                budget[0] -= n + k
                return
        new_blocks = self._grow(req, n)
        while new_blocks is None:
            victim = self._victim()
            budget[0] += self._preempt(victim, scheduled)
            preempted[0] = True
            if victim is req:
                return
            new_blocks = self._grow(req, n)
        scheduled[req.request_id] = _Scheduled(req, n, new_blocks)
        self._charge(req, n)
        budget[0] -= n

    def _admit_next(self, queue: tuple[int, str], scheduled: dict[str, _Scheduled], budget: list[int]) -> bool:
        """Try to start the head of a waiting queue (a seat, an adapter slot, blocks; preempting when
        allowed). False: it cannot start this step, and nothing behind it should jump it."""
        req = self._queues[queue][0][3]
        if req.num_pending or req.request_id in self._preempted_now:
            return False                # preempted (a token in flight, or just now): not back in this step
        if len(self.running) >= self.max_num_seqs:
            return self._preempt_for(req, scheduled, budget)
        if req.adapter_id and self.max_loras and not self._adapter_fits(req.adapter_id):
            return False                # every adapter slot is held by running requests: wait for one
        admitted = self._admit(req, budget[0])
        if admitted is None:
            return self._preempt_for(req, scheduled, budget)
        self._pop_waiting(queue)
        self._tenants[req.tenant].running += 1
        self.predictor.note_admitted()
        scheduled[req.request_id] = admitted
        self._charge(req, admitted.num_new_tokens)
        budget[0] -= admitted.num_new_tokens
        return True

    def _charge(self, req: Request, n: int) -> None:
        t = self._tenants[req.tenant]
        t.counter += n / t.weight

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

    def _victim(self) -> Request:
        """Whom to preempt: batch class before interactive; then the tenant furthest above its fair
        share (largest counter); within it the lowest-priority, newest request (the last in order)."""
        running = self.running
        rank = _RANK[running[-1].service_class]   # the tail holds the lowest class present
        counters = {r.tenant: self._tenants[r.tenant].counter for r in running
                    if _RANK[r.service_class] == rank}
        tenant = max(counters, key=counters.__getitem__)
        for r in reversed(running):
            if r.tenant == tenant and _RANK[r.service_class] == rank:
                return r
        raise AssertionError("unreachable: the tenant has a running request")

    def _preempt(self, victim: Request, scheduled: dict[str, _Scheduled]) -> int:
        """Recompute-preemption: free victim's blocks and put it back at the head of its queue.
        Returns the budget it had been given this step (now free again)."""
        self.running.remove(victim)
        self._preempted_now.add(victim.request_id)
        self._tenants[victim.tenant].running -= 1
        s = scheduled.pop(victim.request_id, None)
        given = 0
        if s is not None:
            given = s.num_new_tokens + s.num_spec_tokens
            self._charge(victim, -given)
        self._release(victim)
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self._push_waiting(victim)
        if victim.deadline_unix_ms:
            heapq.heappush(self._deadlines, (victim.deadline_unix_ms, victim.arrival_seq, victim))
        return given

    def _preempt_for(self, req: Request, scheduled: dict[str, _Scheduled], budget: list[int]) -> bool:
        """Make room (a seat or blocks) for a waiting request: an interactive one preempts a batch one;
        otherwise a strictly lower-priority request of its own tenant or of a tenant not below it in
        fair share (never one that is behind)."""
        if not self.running:
            return False
        victim = None
        tail = self.running[-1]
        if req.service_class == INTERACTIVE and tail.service_class == BATCH:
            victim = self._victim()
        else:
            mine = self._tenants[req.tenant].counter
            for r in reversed(self.running):
                if _RANK[r.service_class] < _RANK[req.service_class] or r.priority >= req.priority:
                    continue
                if r.tenant == req.tenant or self._tenants[r.tenant].counter >= mine:
                    victim = r
                    break
        if victim is None:
            return False
        budget[0] += self._preempt(victim, scheduled)
        return True

    def _make_plan(self, scheduled: dict[str, _Scheduled]) -> StepPlan:
        self._step_id += 1
        plan = StepPlan(step_id=self._step_id, finished_ids=self._worker_forget)
        self._worker_forget = []
        prefill = decode_rows = chunk_tokens = 0
        for s in scheduled.values():
            r = s.request
            n = s.num_new_tokens
            k = s.num_spec_tokens
            # Served tokens per tenant: prompt positions are prefill (a recompute's included), the rest
            # decode (draft slots included: they are computed).
            p = min(n, max(0, r.num_prompt_tokens - r.num_computed_tokens))
            t = self._tenants[r.tenant]
            t.prefill_tokens += p
            t.decode_tokens += n - p + k
            if n == 1 and r.num_computed_tokens >= r.num_prompt_tokens:
                decode_rows += 1
                prefill += k            # verification slots cost like prompt tokens (the predictor's rates)
            else:
                prefill += n
                chunk_tokens += n
            # Advance now, not when the result lands, so the next step can be planned while this
            # one runs (the batcher keeps one plan queued at the worker). A chunk that reaches the
            # end of the sequence samples a token nobody knows yet: count it as pending.
            r.num_computed_tokens += n
            if r.num_computed_tokens == r.num_tokens + r.num_pending:
                r.num_pending += 1
            if k:
                # Drafts are not computed until verified: only the decode token advances now.
                r.spec_inflight = True
                plan.running.append(RunningRequestPlan(r.request_id, n, s.new_block_ids, k, s.draft_token_ids))
            elif r.sent_to_worker:
                plan.running.append(RunningRequestPlan(r.request_id, n, s.new_block_ids))
            else:
                plan.new_requests.append(NewRequestPlan(
                    request_id=r.request_id, token_ids=r.all_token_ids,
                    num_prompt_tokens=r.num_prompt_tokens,
                    num_computed_tokens=r.num_computed_tokens - n, num_new_tokens=n,
                    block_ids=list(r.block_ids), sampling=r.sampling, seed=r.seed,
                    adapter_id=r.adapter_id))
                r.sent_to_worker = True
        if scheduled:
            work = self._step_work
            work[self._step_id] = (prefill, decode_rows, chunk_tokens)
            if len(work) > _STEPS_REMEMBERED:   # a plan whose result never came (worker lost)
                del work[next(iter(work))]
        return plan

    def observe_step(self, step_id: int, execute_s: float, draft_s: float = 0.0, drafted: int = 0) -> None:
        """A step's measured time (StepResult.execute_ms): teaches the wait predictor the rates and
        the speculation policy the step cost (`draft_s` of it the worker's drafter, over `drafted`)."""
        work = self._step_work.pop(step_id, None)
        if work is not None:
            prefill, decode_rows, chunk_tokens = work
            self.predictor.observe_step(prefill, decode_rows, execute_s)
            # The policy prices draft slots from steps of decodes and verifications only: a prompt
            # chunk's tokens are far cheaper each (large matmuls; on CPU the float32 path instead of
            # the few-row block kernels), and fitting them in would underprice a draft slot.
            if self.spec is not None and not chunk_tokens:   # then every prefill token is a draft slot
                self.spec.observe_step(prefill + decode_rows, 1000 * execute_s, 1000 * draft_s, drafted)

    # ---- after the worker ran the plan ------------------------------------------------------
    def update(self, request_ids: list[str], token_ids: list[int], logprobs: list[float] | None,
               num_emitted: list[int] | None = None,
               num_drafted: list[int] | None = None) -> list[tuple[Request, list[int]]]:
        """Append the oldest step in flight's sampled tokens (num_emitted[i] of them for request_ids[i];
        none given: one each); roll speculating requests back to their accepted tokens; cache newly
        full blocks.

        Tokens for a request that finished meanwhile (stop found in an earlier result while this
        step ran) are dropped. Those of one preempted meanwhile are kept: they were sampled from
        valid KV, and the recompute starts after them (its blocks are gone: nothing to roll back)."""
        sampled: list[tuple[Request, list[int]]] = []
        bs = self.block_size
        off = 0
        for i, rid in enumerate(request_ids):
            e = num_emitted[i] if num_emitted else 1
            start, off = off, off + e
            r = self.requests.get(rid)
            if r is None or r.finished:
                continue
            toks = token_ids[start:off]
            r.num_pending -= 1
            if r.output_token_ids:
                r.num_decode_steps += 1
            r.output_token_ids.extend(toks)
            if logprobs is not None:
                r.logprobs.extend(logprobs[start:off])
            if r.spec_inflight:     # also a verification row with nothing drafted: the rollback applies
                self._verified(r, e, num_drafted[i] if num_drafted else 0)
            sampled.append((r, toks))
        for r in self.running:
            if r.num_computed_tokens // bs > r.num_cached_blocks:    # a block filled: cache it (cheap test first)
                self._cache_full_blocks(r)
        return sampled

    def _verified(self, r: Request, emitted: int, drafted: int) -> None:
        """A speculating request's result landed: its KV is valid for its known tokens but the last;
        keep the blocks that covers, return the rest (the worker trims its row by the same rule)."""
        r.spec_inflight = False
        r.spec_proposed += drafted
        if drafted:
            r.spec_accepted += emitted - 1
        if self.spec is not None:
            self.spec.observe(r, drafted, emitted)
        if r.status != RequestStatus.RUNNING:
            return                      # preempted meanwhile: released, recomputed from scratch
        r.num_computed_tokens += emitted - 1
        keep = -(-r.num_computed_tokens // self.block_size)
        if len(r.block_ids) > keep:
            self.allocator.free(r.block_ids[keep:])
            del r.block_ids[keep:]

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
    def tenant_tokens(self) -> dict[str, TenantTokens]:
        """Per tenant: prefill and decode tokens scheduled on this worker since it started, its
        counter, weight, waiting and running requests (copies: the caller may keep them)."""
        return {name: TenantTokens(**vars(t)) for name, t in self._tenants.items()}

    def spec_totals(self) -> dict[str, SpecCounters]:
        """Speculation counters per method since start (copies); empty when speculation is off."""
        return {m: SpecCounters(**vars(c)) for m, c in self.spec.counters.items()} if self.spec else {}

    def stats(self) -> SchedulerStats:
        a = self.allocator
        hit = self._prefix_hit_tokens / self._prefix_queried_tokens if self._prefix_queried_tokens else 0.0
        return SchedulerStats(
            num_running=len(self.running), num_waiting=self.num_waiting, kv_usage=a.usage,
            num_free_blocks=a.num_free_blocks, num_blocks=a.num_blocks,
            prefix_cache_hit_rate=hit, num_preemptions=self.num_preemptions,
            num_deadline_drops=self.num_deadline_drops, tenants=self.tenant_tokens())


def _now() -> float:
    return time.perf_counter()
