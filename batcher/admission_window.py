"""The admission window: after idling, gather a burst's requests into one first step.

A burst's requests reach an idle batcher a few ms apart (the router handles them one by one).
Running a prefill of the first alone would make the rest wait a whole step, so the batcher
waits while arrivals keep coming less than `gap` apart (at most `max_windows` gaps). A lone
request pays one gap.

On a busy box this process can be descheduled past the gap. It then wakes with the window's
timer and the socket both ready, and the timer may be handled before the NATS reader delivers
the arrivals already sitting in the socket: ending the window there splits the burst and the
late half waits a whole prefill step (measured: +160 ms for 3 of 8 requests). So a timer that
fired late, or arrivals signalled while it fired, get one more gap before the window closes.
"""
from __future__ import annotations

import asyncio
import time


class AdmissionWindow:
    def __init__(self, gap_s: float, max_windows: int = 10):
        self.gap_s = gap_s
        self.max_windows = max_windows
        # A timer this late means the process did not run on time (not merely loop jitter).
        self.stall_s = max(0.0005, gap_s / 2)

    async def gather(self, wake: asyncio.Event) -> int:
        """Wait while `wake` keeps being set less than gap_s apart; returns the gaps waited."""
        gap = self.gap_s
        if gap <= 0:
            return 0
        waited = 0
        while waited < self.max_windows:
            waited += 1
            wake.clear()
            start = time.perf_counter()
            if await _wait(wake, gap):
                continue
            stalled = time.perf_counter() - start - gap > self.stall_s
            if wake.is_set() or (stalled and await _wait(wake, gap)):
                continue
            return waited
        return waited


async def _wait(event: asyncio.Event, timeout: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), timeout=timeout)
        return True
    except asyncio.TimeoutError:
        return False
