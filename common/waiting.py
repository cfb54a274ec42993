"""Waiting on things that happen, not on the clock.

`Pulse`: whoever changes some state calls `fire()`; whoever waits for a condition on that state
calls `await pulse.wait_for(predicate, timeout)`, which re-checks the predicate on every fire and
never on a timer. `fire()` is a plain call (no await, no lock), so it can sit in a NATS callback,
a dataclass method or a step loop, and costs nothing when nobody waits.

`wait_set(event, timeout)`: the sleep of a periodic loop (heartbeats, expiry sweeps, retries with
backoff) that ends early when the service stops: `while not await wait_set(stop, interval): ...`.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable


class Pulse:
    """Wakes every current waiter each time it fires. Waiters use the running loop's futures."""

    def __init__(self) -> None:
        self._waiters: set[asyncio.Future] = set()

    def fire(self) -> None:
        waiters, self._waiters = self._waiters, set()
        for f in waiters:
            if not f.done():
                f.set_result(None)

    async def wait(self, timeout: float | None = None) -> bool:
        """Until the next fire (True) or `timeout` seconds (False)."""
        f = asyncio.get_running_loop().create_future()
        self._waiters.add(f)
        try:
            done, _ = await asyncio.wait({f}, timeout=timeout)
        finally:
            self._waiters.discard(f)
            f.cancel()
        return bool(done)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """Until `predicate()` holds (True), checked now and after every fire; False once `timeout`
        seconds have passed without it."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not predicate():
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return False
            if not await self.wait(left):
                return predicate()
        return True


async def wait_set(event: asyncio.Event, timeout: float | None) -> bool:
    """True as soon as `event` is set, False after `timeout` seconds without it."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
    return bool(done)
