"""Driving an EngineCore the way the batcher drives its worker (batcher/service.py `_run`): up to
`depth` plans at the worker at once, results processed in order."""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator


def drive(core, execute: Callable, depth: int = 1, on_plan: Callable | None = None,
          max_steps: int = 100_000) -> Iterator[list]:
    """Yields the outputs of each step until nothing is unfinished. `on_plan(plan, queued)` sees
    every plan before it joins the plans already at the worker."""
    queued: deque = deque()
    for _ in range(max_steps):
        if not core.has_unfinished() and not queued:
            return
        while len(queued) < depth and core.has_unfinished():
            plan = core.schedule()
            if plan.is_empty and not plan.finished_ids:
                break
            if on_plan is not None:
                on_plan(plan, queued)
            queued.append(plan)
        assert queued, "work left but nothing schedulable"
        yield core.process(execute(queued.popleft()))
    raise AssertionError(f"still unfinished after {max_steps} steps")
