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
    """A request the worker already holds: compute its next num_new_tokens tokens."""
    request_id: str
    num_new_tokens: int
    new_block_ids: list[int] = field(default_factory=list)   # appended to its block table


@dataclass
class StepPlan:
    step_id: int
    new_requests: list[NewRequestPlan] = field(default_factory=list)
    running: list[RunningRequestPlan] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)   # forget these first (finished/aborted/preempted)

    @property
    def num_tokens(self) -> int:
        return sum(r.num_new_tokens for r in self.new_requests) + sum(r.num_new_tokens for r in self.running)

    @property
    def is_empty(self) -> bool:
        return not self.new_requests and not self.running


@dataclass
class StepResult:
    """Tokens sampled this step: one per request whose scheduled chunk reached its last known token."""
    step_id: int
    request_ids: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None     # sampled token's logprob, when any request asked
    execute_ms: float = 0.0                  # wall time of the forward + sampling on the worker
