"""The launcher's restart policy: backoff per supervised unit, and each unit's state for stack.json.

A unit is what lives and dies together: nats, kv_manager, router, triton_front, or one batcher with
its worker (the batcher's engine state refers to the worker's KV blocks, so neither outlives the
other). When a member dies the launcher stops the rest of the unit, waits `Backoff.delay` and starts
it again; a unit that stayed up for `reset_after_s` starts over at the shortest delay.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """0.5 s, 1 s, 2 s, ... up to 10 s between restarts; back to 0.5 s after a minute of health."""
    initial_s: float = 0.5
    factor: float = 2.0
    max_s: float = 10.0
    reset_after_s: float = 60.0
    failures: int = 0   # consecutive quick deaths so far

    def delay(self, up_for_s: float) -> float:
        """The wait before the next restart of a unit that died after `up_for_s` seconds up."""
        if up_for_s >= self.reset_after_s:
            self.failures = 0
        d = min(self.max_s, self.initial_s * self.factor ** self.failures)
        self.failures += 1
        return d


@dataclass
class Unit:
    """One supervised unit: its state for `switchyard status` and its backoff."""
    name: str
    members: list[str]                       # child names (a pair: worker-wX, batcher-wX)
    state: str = "up"                        # "up" | "restarting"
    restarts: int = 0
    last_exit_code: int | None = None
    last_exited: str | None = None           # which member died (a pair has two)
    restarting_since: float | None = None    # wall-clock time the unit went down
    up_since: float = field(default_factory=time.monotonic)
    restart_at: float = 0.0                  # monotonic time of the next start
    backoff: Backoff = field(default_factory=Backoff)

    def died(self, member: str, code: int | None, now: float | None = None) -> float:
        """A member exited: note it, go `restarting`; returns the delay before the restart."""
        now = time.monotonic() if now is None else now
        self.state = "restarting"
        self.last_exit_code = code
        self.last_exited = member
        self.restarting_since = time.time()
        wait = self.backoff.delay(now - self.up_since)
        self.restart_at = now + wait
        return wait

    def due(self, now: float | None = None) -> bool:
        return self.state == "restarting" and (time.monotonic() if now is None else now) >= self.restart_at

    def restarted(self, now: float | None = None) -> None:
        self.state = "up"
        self.restarts += 1
        self.restarting_since = None
        self.up_since = time.monotonic() if now is None else now

    def snapshot(self) -> dict:
        return {"state": self.state, "restarts": self.restarts, "last_exit_code": self.last_exit_code,
                "last_exited": self.last_exited or "", "restarting_since": self.restarting_since,
                "members": list(self.members)}
