"""When to send the next plan: just before the worker finishes the step it is running.

The batcher plans step N+1 while the worker runs step N, so the worker never waits for the
batcher's schedule, encode and gRPC round trip (DESIGN.md's departure list explains why). Sending
N+1 the moment N starts would make a request that arrives during N wait for N+1 to finish too;
sending it shortly before N ends keeps those arrivals in N+1. The end is predicted from recent
steps with the same number of tokens (a steady decode batch repeats its shape step after step).
A shape not seen recently gives no prediction: the batcher then waits for the result (no overlap
for that step rather than a late admission).
"""
from __future__ import annotations

from collections import OrderedDict

LEAD_FRACTION = 0.15    # send this share of the predicted step early: covers timing noise
LEAD_MIN_S = 0.0015     # and at least this: schedule + encode + write take ~1 ms
_ALPHA = 0.5            # EWMA weight of the newest observation
_SHAPES = 64            # token counts remembered


class StepTimer:
    def __init__(self, lead_fraction: float = LEAD_FRACTION, lead_min_s: float = LEAD_MIN_S):
        self.lead_fraction = lead_fraction
        self.lead_min_s = lead_min_s
        self._by_tokens: OrderedDict[int, float] = OrderedDict()   # num_tokens -> execute seconds (EWMA)

    def observe(self, num_tokens: int, execute_s: float) -> None:
        old = self._by_tokens.pop(num_tokens, None)
        self._by_tokens[num_tokens] = execute_s if old is None else _ALPHA * execute_s + (1 - _ALPHA) * old
        if len(self._by_tokens) > _SHAPES:
            self._by_tokens.popitem(last=False)

    def predict_s(self, num_tokens: int) -> float | None:
        return self._by_tokens.get(num_tokens)

    def send_next_at(self, started_at: float, num_tokens: int) -> float | None:
        """Monotonic time to send the plan after a step of `num_tokens` that started at `started_at`;
        None: no prediction, wait for its result."""
        est = self.predict_s(num_tokens)
        if est is None:
            return None
        return started_at + est - max(self.lead_min_s, self.lead_fraction * est)
