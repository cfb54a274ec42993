"""Speculative decoding in the batcher: which requests speculate this step, with how many drafts.

A request speculates only in decode state (every known token but the last computed, nothing in
flight): its row gets 1 + k query slots, the decode token and k drafts, and the worker emits the
accepted drafts plus one token (workers/engine/plan.py). Model-free methods draft here, from the
request's own context (`prompt_lookup`, batcher/prompt_lookup.py), from this deployment's recent
completions (`suffix`, batcher/suffix_cache.py) or both (`ngram`: prompt lookup, then suffix); the
draft-model methods (`self_draft`, `draft_model`) only get k and the worker's drafter proposes.

The policy (`SpecPolicy.plan`), per request per step, is a marginal throughput test:

* Step cost. Step time is fitted as base + per_token x tokens over recent steps (least squares on
  exponentially forgotten sums, `StepCost`). k extra query tokens cost per_token x k for the whole
  batch; a worker drafter adds its measured cost per draft token (draft_ms / drafts).
* Value of a millisecond. The batch produces B decode tokens per T0 = base + per_token x B ms, so a
  millisecond of extra step time costs B / T0 tokens. lambda = cost of one draft x B / T0 is the
  price of one draft position in tokens; at batch 1 it is small (a step is mostly weight reads), in
  a large batch it approaches 1 (compute-bound: every query token costs about a token's worth).
* Gain. With per-token acceptance alpha the j-th draft adds alpha^j expected tokens, so the best k
  is the largest with alpha^k > lambda (k = floor(log lambda / log alpha), capped by
  num_speculative_tokens), and speculation is on when the net gain sum_j alpha^j - lambda x k is
  positive: off when acceptance is below break-even (alpha <= lambda) or the batch is compute-bound.
  When the plan is made while another step runs (the batcher's step pipeline), speculating costs
  the request one step (see below), so the net gain must exceed one token.
* Acceptance. alpha is the maximum-likelihood rate of a truncated geometric (accepted drafts /
  (accepted + rejections)), from exponentially forgotten sums per method (deployment) and per
  request (seeded from its method's). Rows with no drafts teach nothing.
* Re-probing. A request turned off for low acceptance speculates with k = 1 every PROBE_INTERVAL
  decode steps while the batch is not compute-bound, so one bad stretch does not disable it for good
  (the deployment's rate moves with every probe too). No probes in compute-bound steps: lambda
  comes from the step-time fit and the batch size, not from speculating, so when load falls the
  policy turns speculation back on by itself.

The suffix cache learns each finished output (its first SUFFIX_FEED_TOKENS: adding walks depth x
length trie nodes in Python), one output per step at the next steps, never on the finishing step.

`speculative_adaptive=False`: always num_speculative_tokens (model-free: the drafts found, at most
that many). Cost per step is O(batch) with O(1) arithmetic per request; drafts are looked up only
for requests the policy lets speculate (a compute-bound batch does no lookups at all).

Step pipelining (batcher/service.py plans step N+1 while N runs; the in-process CUDA engine too) and
speculation pull apart: a pipelined decode is planned while its previous token is still unknown, so
it is never in decode state, and a speculating request cannot be planned again until its result
lands (its accepted count decides its position). The scheduler therefore skips a request with a
token in flight when it is speculating (`wants_pending`: its last decision drafted), so it is in
decode state at the next plan. The price: under pipelining a speculating request runs every other
step (E tokens per two steps against two for a pipelined plain decode), hence the one-token penalty
above; a request not speculating stays pipelined and is re-checked (skipped once, so it is in decode
state, where drafts can be looked up and an off request is probed) after RECHECK_INTERVAL steps,
doubling with each check that did not speculate (up to 16x), and never while the batch is
compute-bound, so a request with nothing to copy loses under 1% of its steps once backed off. With one
request alone nothing is in flight at planning time, so nothing is lost (lockstep); the CPU in-process
engine does not pipeline at all.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from batcher.prompt_lookup import propose_from_context
from batcher.suffix_cache import SuffixCache
from workers.engine.config import MODEL_FREE_SPEC_METHODS

PRIOR_ALPHA = 0.6           # a method's acceptance before anything is measured
METHOD_DECAY = 0.02         # weight of one verification row in the method's sums (~50 rows remembered)
REQUEST_DECAY = 0.25        # ... in a request's sums (~4 rows)
PROBE_INTERVAL = 16         # decode steps a low-acceptance request waits before speculating with k = 1 again
RECHECK_INTERVAL = 8        # pipelined plain decodes before a request is re-checked in decode state
PROBE_MAX_LAMBDA = 0.5      # no probes nor re-checks when a draft costs at least this many tokens
ALPHA_MAX = 0.995
COST_DECAY = 0.05           # weight of one step in the step-time fit (~20 steps remembered)
SUFFIX_FEED_TOKENS = 128    # of a finished output, what the suffix cache learns (adding costs ~30 us a token)


@dataclass
class SpecCounters:
    """Cumulative per method since the engine started: drafts verified, accepted, verification rows
    (a request's speculative decode in one step), and tokens those rows emitted."""
    proposed: int = 0
    accepted: int = 0
    verify_rows: int = 0
    emitted: int = 0


@dataclass
class SpecState:
    """A request's speculation state (Request.spec)."""
    acc: float                  # forgotten sums: accepted drafts, rejections
    rej: float
    active: bool = False        # its last decode-state decision speculated
    off_steps: int = 0          # decode-state decisions the policy turned off since it last speculated
    plain_pending: int = RECHECK_INTERVAL   # pipelined plain decodes since its last decode-state decision
    misses: int = 0             # decode-state decisions in a row that did not speculate (re-check backoff)
    buf: np.ndarray | None = None   # its tokens for prompt lookup, appended as they come (no copy per step)
    n: int = 0

    @property
    def alpha(self) -> float:
        s = self.acc + self.rej
        return min(ALPHA_MAX, self.acc / s) if s > 0 else PRIOR_ALPHA


_INELIGIBLE = SpecState(0.0, 1.0)   # penalties (the worker applies none across draft positions)


class StepCost:
    """Step time ~ base + per_token x tokens, least squares over exponentially forgotten steps."""

    def __init__(self, decay: float = COST_DECAY):
        self.decay = decay
        self.n = self.t = self.y = self.tt = self.ty = 0.0
        self.base_ms = 0.0
        self.per_token_ms = 0.0

    def observe(self, tokens: int, ms: float) -> None:
        if tokens <= 0 or ms <= 0:
            return
        keep = 1.0 - self.decay
        self.n = keep * self.n + 1.0
        self.t = keep * self.t + tokens
        self.y = keep * self.y + ms
        self.tt = keep * self.tt + tokens * tokens
        self.ty = keep * self.ty + tokens * ms
        mt, my = self.t / self.n, self.y / self.n
        var = self.tt / self.n - mt * mt
        if var > 0.25:   # sizes differ enough to tell the slope; else keep the last one
            slope = (self.ty / self.n - mt * my) / var
            self.per_token_ms = min(max(slope, 0.0), my / mt)
        self.base_ms = max(0.0, my - self.per_token_ms * mt)

    @property
    def measured(self) -> bool:
        return self.n > 0


def best_k(alpha: float, lam: float, k_max: int, penalty: float = 0.0) -> int:
    """Drafts worth verifying: the largest k with alpha^k > lam, when sum_{j<=k} alpha^j - lam x k
    exceeds `penalty` tokens; 0 otherwise."""
    if k_max <= 0 or alpha <= lam or alpha <= 0.0:
        return 0
    if lam <= 0.0:
        k = k_max
    else:
        k = min(k_max, max(1, int(math.log(lam) / math.log(alpha))))
    gain = alpha * (1.0 - alpha ** k) / (1.0 - alpha) - lam * k
    return k if gain > penalty else 0


class SpecPolicy:
    """One per engine: the method's acceptance, the step-cost fit, drafting, the counters."""

    def __init__(self, method: str, num_speculative_tokens: int = 4, adaptive: bool = True):
        self.method = method
        self.k_max = num_speculative_tokens
        self.adaptive = adaptive
        self.model_free = method in MODEL_FREE_SPEC_METHODS
        self.suffix = SuffixCache() if method in ("suffix", "ngram") else None
        self._to_learn: deque[list[int]] = deque()   # finished outputs for the suffix cache, one per step
        self.counters: dict[str, SpecCounters] = {method: SpecCounters()}
        self._acc, self._rej = PRIOR_ALPHA, 1.0 - PRIOR_ALPHA
        self.cost = StepCost()
        self._draft_ms_per_token = 0.0
        self.lam = 0.0                  # this step's price of one draft position, in tokens
        self.pipelined = False          # this plan runs after a step still in flight

    @property
    def alpha(self) -> float:
        """The method's measured acceptance rate (deployment-wide)."""
        return min(ALPHA_MAX, self._acc / (self._acc + self._rej))

    # ---- per step ---------------------------------------------------------------------------
    def begin_step(self, decode_rows: int, pipelined: bool) -> None:
        c = self.cost
        t0 = c.base_ms + c.per_token_ms * decode_rows
        per = c.per_token_ms + self._draft_ms_per_token
        self.lam = per * decode_rows / t0 if t0 > 0 else 0.0
        self.pipelined = pipelined
        if self._to_learn:             # one per step: a burst of finishes does not stall one step
            self.suffix.add(self._to_learn.popleft())

    def observe_step(self, tokens: int, execute_ms: float, draft_ms: float = 0.0, drafted: int = 0) -> None:
        """A step's measured time, its query tokens, and (worker drafter) the drafting part."""
        self.cost.observe(tokens, execute_ms - draft_ms)
        if drafted > 0 and draft_ms > 0:
            d = self._draft_ms_per_token
            x = draft_ms / drafted
            self._draft_ms_per_token = x if d == 0.0 else d + COST_DECAY * (x - d)

    # ---- per request --------------------------------------------------------------------------
    def state(self, req) -> SpecState:
        st = req.spec
        if st is None:
            sp = req.sampling
            if sp.repetition_penalty != 1.0 or sp.presence_penalty != 0.0:
                st = _INELIGIBLE
            else:
                a = self.alpha
                st = SpecState(a, 1.0 - a)
            req.spec = st
        return st

    def wants_pending(self, req) -> bool:
        """A decode whose previous token is still in flight: True to skip it this step so it is in
        decode state at the next (it speculates, or is due a re-check)."""
        st = self.state(req)
        if st is _INELIGIBLE:
            return False
        if st.active:
            return True
        st.plain_pending += 1
        if st.plain_pending <= RECHECK_INTERVAL << min(st.misses, 4):   # 8 .. 128 steps apart
            return False
        return not self.adaptive or self.lam < PROBE_MAX_LAMBDA

    def plan(self, req, cap: int) -> tuple[int, list[int]]:
        """A request in decode state: (k, drafts) for its row; (0, []) for a plain decode. `cap`: the
        most drafts it may verify (max_tokens, the context, the step's budget)."""
        st = self.state(req)
        if st is _INELIGIBLE:
            return 0, []
        st.plain_pending = 0
        if cap <= 0:
            st.active = False
            return 0, []
        k_max = min(self.k_max, cap)
        if self.adaptive:
            k = best_k(st.alpha, self.lam, k_max, 1.0 if self.pipelined else 0.0)
            if k == 0:
                st.off_steps += 1
                # a probe (is its acceptance still that low?) every PROBE_INTERVAL decisions; pipelined,
                # being in decode state was a re-check already paid for (backed off by misses)
                if (st.off_steps < PROBE_INTERVAL and not self.pipelined) or self.lam >= PROBE_MAX_LAMBDA:
                    return self._plain(st)
                k = 1
        else:
            k = k_max
        drafts: list[int] = []
        if self.model_free:
            drafts = self.propose(req, k)
            if not drafts:
                return self._plain(st)  # nothing to copy now (not a verdict on its acceptance)
            k = len(drafts)
        st.off_steps = st.misses = 0
        st.active = True
        return k, drafts

    @staticmethod
    def _plain(st: SpecState) -> tuple[int, list[int]]:
        st.active = False
        st.misses += 1
        return 0, []

    def propose(self, req, k: int) -> list[int]:
        """Model-free drafts for req's context, at most k."""
        m = self.method
        if m in ("prompt_lookup", "ngram"):
            d = propose_from_context(self._context(req), k)
            if d.size or m == "prompt_lookup":
                return d.tolist()
        if self.suffix is None:
            return []
        depth = self.suffix.depth
        out = req.output_token_ids
        ctx = out[-depth:] if len(out) >= depth else req.prompt_token_ids[-(depth - len(out)):] + out
        return self.suffix.propose(ctx, k)

    @staticmethod
    def _context(req) -> np.ndarray:
        """req's tokens as an array, kept on its state and extended by what is new since last time."""
        st = req.spec
        prompt, out = req.prompt_token_ids, req.output_token_ids
        total = len(prompt) + len(out)
        if st.buf is None or len(st.buf) < total:
            grown = np.empty(max(2 * total, 64), dtype=np.int64)
            grown[:st.n] = st.buf[:st.n] if st.buf is not None else grown[:0]
            st.buf = grown
        if st.n < total:
            p = len(prompt)
            if st.n < p:
                st.buf[st.n:p] = prompt[st.n:]
                st.n = p
            st.buf[st.n:total] = out[st.n - p:]
            st.n = total
        return st.buf[:total]

    def observe(self, req, drafted: int, emitted: int) -> None:
        """A verification row's result: `drafted` drafts verified, `emitted` tokens (accepted + 1)."""
        c = self.counters[self.method]
        c.verify_rows += 1
        c.emitted += emitted
        if drafted <= 0:
            return
        accepted = emitted - 1
        c.proposed += drafted
        c.accepted += accepted
        rejected = 1.0 if accepted < drafted else 0.0
        keep = 1.0 - METHOD_DECAY
        self._acc = keep * self._acc + METHOD_DECAY * accepted
        self._rej = keep * self._rej + METHOD_DECAY * rejected
        st = self.state(req)
        if st is not _INELIGIBLE:
            keep = 1.0 - REQUEST_DECAY
            st.acc = keep * st.acc + REQUEST_DECAY * accepted
            st.rej = keep * st.rej + REQUEST_DECAY * rejected

    def on_finish(self, req) -> None:
        """A request finished normally: its output (the first SUFFIX_FEED_TOKENS) joins the suffix
        cache at the next step."""
        if self.suffix is not None and req.output_token_ids:
            self._to_learn.append(req.output_token_ids[:SUFFIX_FEED_TOKENS])
