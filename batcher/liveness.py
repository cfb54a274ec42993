"""How long a worker step may run before the batcher calls its worker hung.

A heartbeat says the batcher is alive; only a step that comes back says the worker is. The batcher
waits for each step's result at most `budget_s`: `factor` x the step's predicted time (the median of
recent steps of its shape, batcher/step_timing.py) + `floor_s`. A shape not measured yet is scaled
linearly from the largest shape measured (an over-estimate for a prefill, whose cost per token falls
with its length); before any step was measured (the first prefill, kernel compilation) the bound is
`cold_s`. Past the budget the batcher marks the replica unhealthy (heartbeat `unhealthy_reason`),
fails its streams with reason `worker_hung` (the router migrates them) and exits with
EXIT_WORKER_HUNG, so the launcher restarts the batcher+worker pair (services/supervision.py).
"""
from __future__ import annotations

from batcher.step_timing import StepTimer

EXIT_WORKER_HUNG = 75   # the batcher's exit code after a step overran (shown by `switchyard status`)
# Past the budget, one more short wait: when the batcher itself was stopped (SIGSTOP, a stalled
# host), its timers fire on resume before the result already waiting on its socket is read.
HUNG_GRACE_S = 0.5


class StepWatch:
    def __init__(self, timer: StepTimer, factor: float, floor_s: float, cold_s: float):
        self.timer = timer
        self.factor = factor
        self.floor_s = floor_s
        self.cold_s = cold_s
        self._largest: tuple[int, float] | None = None   # (tokens, seconds) of the largest step seen

    def observe(self, num_tokens: int, execute_s: float) -> None:
        """Called with each finished step (alongside StepTimer.observe)."""
        big = self._largest
        if big is None or num_tokens >= big[0]:
            self._largest = (num_tokens, execute_s)

    def predict_s(self, num_tokens: int) -> float | None:
        est = self.timer.predict_s(num_tokens)
        if est is not None:
            return est
        big = self._largest
        if big is None:
            return None
        return big[1] * max(1.0, num_tokens / max(1, big[0]))

    def budget_s(self, num_tokens: int) -> float:
        """The longest a step of `num_tokens` may take before its worker counts as hung."""
        est = self.predict_s(num_tokens)
        if est is None:
            return max(self.cold_s, self.floor_s)
        return self.factor * est + self.floor_s
