"""A request as the batcher's scheduler sees it (plain data)."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from workers.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from batcher.spec_policy import SpecState


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"       # EOS, stop token id or stop string
    FINISHED_LENGTH = "length"      # max_tokens or context limit
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


@dataclass
class RequestTimes:
    """Wall-clock milestones (time.perf_counter seconds) for usage and latency breakdown."""
    arrival: float = field(default_factory=time.perf_counter)
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None

    def queue_ms(self) -> float:
        return 1000.0 * ((self.first_scheduled or self.arrival) - self.arrival)

    def prefill_ms(self) -> float:
        if self.first_scheduled is None or self.first_token is None:
            return 0.0
        return 1000.0 * (self.first_token - self.first_scheduled)

    def decode_ms(self) -> float:
        if self.first_token is None or self.finished is None:
            return 0.0
        return 1000.0 * (self.finished - self.first_token)


@dataclass(eq=False)   # identity semantics: two requests are never 'equal'
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    seed: int
    priority: int = 0                  # higher is scheduled first; ties FIFO by arrival order
    adapter_id: str | None = None
    arrival_seq: int = 0               # admission order, the FIFO tie-break
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)   # chained hashes of its full blocks
    num_cached_blocks: int = 0         # leading blocks registered in the prefix cache
    num_computed_tokens: int = 0       # tokens whose KV is in block_ids, or is being written by a step in flight
    num_pending: int = 0               # tokens steps in flight will sample (not known yet)
    num_cached_tokens: int = 0         # prefix-cache hit at first schedule (usage reporting)
    num_preemptions: int = 0
    sent_to_worker: bool = False       # the worker holds its state (else it goes out as a NewRequestPlan)
    # fair shares and service classes (batcher/scheduler.py): normalised there ("" -> default/interactive)
    tenant: str = "default"
    tenant_weight: float = 1.0         # its share of the worker relative to other tenants' weights
    service_class: str = "interactive"  # interactive (deadline-driven) | batch (fills idle capacity)
    deadline_unix_ms: int = 0          # 0: none; still waiting past it -> dropped (CHUNK_ERROR_DEADLINE)
    # speculative decoding (batcher/spec_policy.py): drafts verified and accepted, decode steps taken
    spec_proposed: int = 0
    spec_accepted: int = 0
    num_decode_steps: int = 0
    spec: SpecState | None = None      # the policy's view of it (acceptance, on/off), set at its first decode
    spec_inflight: bool = False        # a verification step of it is in flight: not planned until it lands
    times: RequestTimes = field(default_factory=RequestTimes)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def finished(self) -> bool:
        return self.status.finished
