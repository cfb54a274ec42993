"""When to send the next plan: just before the worker finishes the step it is running.

The batcher plans step N+1 while the worker runs step N, so the worker never waits for the
batcher's schedule, encode and gRPC round trip (DESIGN.md's departure list explains why). Sending
N+1 the moment N starts would make a request that arrives during N wait for N+1 to finish too;
sending it shortly before N ends keeps those arrivals in N+1. The end is predicted from recent
steps with the same number of tokens (a steady decode batch repeats its shape step after step):
the median of the last few, because on a shared box about one step in seven runs 40-50% long,
and an average that chases those sends the next plan late for the normal steps after them
(replayed on 279 measured steps: an EWMA minus 15% left the worker idle after 12% of steps,
the median of 5 minus 10% after 1%, while sending a little less early on average).
A shape not seen recently gives no prediction: the batcher then waits for the result (no overlap
for that step rather than a late admission).
"""
from __future__ import annotations

import statistics
from collections import OrderedDict, deque

LEAD_FRACTION = 0.10    # send this share of the predicted step early: covers timing noise
LEAD_MIN_S = 0.0015     # and at least this: schedule + encode + write take ~1 ms
_WINDOW = 5             # recent steps per shape whose median is the prediction
_SHAPES = 64            # token counts remembered


class StepTimer:
    def __init__(self, lead_fraction: float = LEAD_FRACTION, lead_min_s: float = LEAD_MIN_S):
        self.lead_fraction = lead_fraction
        self.lead_min_s = lead_min_s
        # num_tokens -> (recent execute seconds, their median), least recently seen shape first
        self._by_tokens: OrderedDict[int, tuple[deque[float], float]] = OrderedDict()

    def observe(self, num_tokens: int, execute_s: float) -> None:
        entry = self._by_tokens.pop(num_tokens, None)
        recent = entry[0] if entry is not None else deque(maxlen=_WINDOW)
        recent.append(execute_s)
        self._by_tokens[num_tokens] = (recent, statistics.median(recent))
        if len(self._by_tokens) > _SHAPES:
            self._by_tokens.popitem(last=False)

    def predict_s(self, num_tokens: int) -> float | None:
        entry = self._by_tokens.get(num_tokens)
        return entry[1] if entry is not None else None

    def send_next_at(self, started_at: float, num_tokens: int) -> float | None:
        """Monotonic time to send the plan after a step of `num_tokens` that started at `started_at`;
        None: no prediction, wait for its result."""
        est = self.predict_s(num_tokens)
        if est is None:
            return None
        return started_at + est - max(self.lead_min_s, self.lead_fraction * est)
