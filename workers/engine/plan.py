"""The batcher -> worker contract, one StepPlan in and one StepResult out per engine step.

Plain dataclasses (no torch): the batcher builds them, the worker executes them. In-process they
are passed by call; across processes `workers/service.py` maps them to `switchyard.v1` protobufs.
The worker mirrors each running request (its tokens and block table) so that a running request
costs only its id, its appended block ids and its chunk length on the wire.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from workers.engine.sampling_params import SamplingParams


@dataclass
class NewRequestPlan:
    """A request the worker has not seen (or must recompute after a preemption), sent in full once."""
    request_id: str
    token_ids: list[int]        # every token known so far: prompt, plus earlier output after a preemption
    num_prompt_tokens: int      # token_ids[:num_prompt_tokens] is the prompt (penalties need the split)
    num_computed_tokens: int    # leading tokens whose KV is already in the blocks (prefix-cache hit)
    num_new_tokens: int         # tokens to compute this step, starting at num_computed_tokens
    block_ids: list[int]        # the whole block table
    sampling: SamplingParams
    seed: int                   # resolved seed (SamplingParams.seed or one drawn at admission)
    adapter_id: str | None = None


@dataclass
class RunningRequestPlan:
    """A request the worker already holds: compute its next num_new_tokens tokens.

    Speculation (num_spec_tokens k > 0, only on a decode, num_new_tokens == 1): k more query slots
    follow the decode token, blocks already allotted for all 1 + k. draft_token_ids are the batcher's
    model-free drafts (prompt lookup, suffix match; len <= k); empty with k > 0: the worker's draft
    model proposes k. The worker verifies them in this step's forward and emits the accepted drafts
    plus one token; then both sides roll the request back to the accepted tokens (see StepResult)."""
    request_id: str
    num_new_tokens: int
    new_block_ids: list[int] = field(default_factory=list)   # appended to its block table
    num_spec_tokens: int = 0
    draft_token_ids: list[int] = field(default_factory=list)


@dataclass
class StepPlan:
    step_id: int
    new_requests: list[NewRequestPlan] = field(default_factory=list)
    running: list[RunningRequestPlan] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)   # forget these first (finished/aborted/preempted)

    @property
    def num_tokens(self) -> int:
        return (sum(r.num_new_tokens for r in self.new_requests)
                + sum(r.num_new_tokens + r.num_spec_tokens for r in self.running))

    @property
    def is_empty(self) -> bool:
        return not self.new_requests and not self.running


@dataclass
class StepResult:
    """Tokens sampled this step: one per request whose scheduled chunk reached its last known token,
    or, for a speculating request, its accepted drafts plus one (1..k+1 tokens, in order).

    num_emitted empty: one token per request id. Else num_emitted[i] tokens of token_ids (and
    logprobs) belong to request_ids[i], consecutively; num_drafted[i] is how many drafts were
    verified for it (0: it did not speculate), so accepted = num_emitted[i] - 1 when drafted.
    After a verification step a request's KV is valid for its known tokens but the last, and it keeps
    ceil(that count / block_size) blocks: the worker trims its table row, the batcher frees the rest
    (the same rule on both sides, so no block ids travel back)."""
    step_id: int
    request_ids: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None     # sampled token's logprob, when any request asked
    execute_ms: float = 0.0                  # wall time of the forward + sampling on the worker
    num_emitted: list[int] = field(default_factory=list)
    num_drafted: list[int] = field(default_factory=list)
    draft_ms: float = 0.0                    # of execute_ms: the worker's draft model proposing
