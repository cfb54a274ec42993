"""Autoscaling on queue depth (not CPU): desired replicas per model from waiting + running.

    desired = clamp(ceil(queue_depth / target_per_replica), min_replicas, max_replicas)

with hysteresis: a change of `actual` is only recommended once `desired` has stayed above
(scale-up window) or below (scale-down window) it for that long, one replica at a time downwards;
a model with min_replicas = 0 and no work for `idle_to_zero_s` goes to zero. Pure logic (no
processes, no clocks of its own): PoolManager feeds it observations and acts on the answer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from common.catalog import ScalerSpec


@dataclass
class ModelScaleState:
    desired: int = 0
    above_since: float | None = None          # desired > actual since
    below_since: float | None = None          # desired < actual since
    last_busy: float = 0.0                    # last time queue_depth > 0


@dataclass
class Decision:
    desired: int                              # what the metric says now (reported as a gauge)
    target: int                               # what the pool should run now (actual, or actual +/- n)


class Scaler:
    def __init__(self, spec: ScalerSpec):
        self.spec = spec
        self.state: dict[str, ModelScaleState] = {}

    def raw_desired(self, queue_depth: int, min_r: int, max_r: int) -> int:
        want = math.ceil(queue_depth / max(self.spec.target_per_replica, 1e-9)) if queue_depth > 0 else 0
        return max(min_r, min(max_r, want))

    def observe(self, model: str, queue_depth: int, actual: int, min_r: int, max_r: int, now: float) -> Decision:
        st = self.state.setdefault(model, ModelScaleState(last_busy=now))
        if queue_depth > 0:
            st.last_busy = now
        desired = self.raw_desired(queue_depth, min_r, max_r)
        if desired == 0 and actual > 0 and now - st.last_busy < self.spec.idle_to_zero_s:
            desired = max(1, min_r)   # idle but not for long: keep one warm
        st.desired = desired
        target = actual
        if desired > actual:
            st.below_since = None
            st.above_since = st.above_since if st.above_since is not None else now
            if now - st.above_since >= self.spec.scale_up_window_s and actual > 0:
                target = desired          # scale up all at once (a spike must be met quickly)
                st.above_since = None
        elif desired < actual:
            st.above_since = None
            st.below_since = st.below_since if st.below_since is not None else now
            window = self.spec.idle_to_zero_s if desired == 0 else self.spec.scale_down_window_s
            if desired == 0 or now - st.below_since >= window:
                target = actual - 1       # scale down one replica at a time
                st.below_since = None
        else:
            st.above_since = st.below_since = None
        return Decision(desired, target)

    def forget(self, model: str) -> None:
        self.state.pop(model, None)
