"""Load shapes and the open/closed-loop driver.

Arrival schedules are pure, seeded functions returning offsets in seconds from the run start:
- poisson: exponential gaps at `rate` requests/s.
- gamma: gamma gaps with shape `burstiness` and mean 1/rate (burstiness 1 = Poisson; < 1 burstier,
  > 1 more regular: vLLM's definition).
- spike: Poisson at a base rate, then factor x base for a while, then the base rate again.
- concurrency: closed loop, C requests always in flight (no schedule).
A rate sweep is several Poisson runs, one per rate (serve.py runs them in turn).

`drive` sends each request at its offset (or keeps C in flight), lets the target fill a
RequestRecord, and samples the target's queue depth for the timeline.
"""
from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from dataclasses import dataclass, field

from bench.metrics import RequestRecord


@dataclass
class LoadShape:
    kind: str = "poisson"               # poisson | gamma | concurrency | spike
    rate: float = 1.0                   # requests/s (spike: the base rate)
    burstiness: float = 1.0             # gamma shape
    concurrency: int = 1
    spike_factor: float = 10.0
    spike_before_s: float = 5.0
    spike_s: float = 5.0
    spike_after_s: float = 10.0

    def describe(self) -> dict:
        d = {"kind": self.kind}
        if self.kind in ("poisson", "gamma", "spike"):
            d["rate"] = self.rate
        if self.kind == "gamma":
            d["burstiness"] = self.burstiness
        if self.kind == "concurrency":
            d["concurrency"] = self.concurrency
        if self.kind == "spike":
            d.update(spike_factor=self.spike_factor, spike_before_s=self.spike_before_s, spike_s=self.spike_s,
                     spike_after_s=self.spike_after_s)
        return d


# ---- schedules -------------------------------------------------------------------------------
def poisson_times(n: int, rate: float, seed: int = 0) -> list[float]:
    return gamma_times(n, rate, 1.0, seed)


def gamma_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    if rate <= 0 or math.isinf(rate):
        return [0.0] * n                # everything at once
    if burstiness <= 0:
        raise ValueError("burstiness must be > 0")
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out


def spike_times(base_rate: float, factor: float = 10.0, before_s: float = 5.0, spike_s: float = 5.0,
                after_s: float = 10.0, seed: int = 0) -> list[float]:
    """Poisson arrivals whose rate is base, base*factor during [before_s, before_s+spike_s), then base."""
    rng = random.Random(seed)
    end = before_s + spike_s + after_s
    t, out = 0.0, []
    while True:
        rate = base_rate * factor if before_s <= t < before_s + spike_s else base_rate
        gap = rng.expovariate(rate)
        # a gap that crosses a phase boundary restarts at the boundary (memoryless, so still Poisson)
        for b in (before_s, before_s + spike_s):
            if t < b < t + gap:
                t, gap = b, None
                break
        if gap is None:
            continue
        t += gap
        if t >= end:
            return out
        out.append(t)


def arrival_times(shape: LoadShape, n: int, seed: int = 0) -> list[float] | None:
    if shape.kind == "poisson":
        return poisson_times(n, shape.rate, seed)
    if shape.kind == "gamma":
        return gamma_times(n, shape.rate, shape.burstiness, seed)
    if shape.kind == "spike":
        return spike_times(shape.rate, shape.spike_factor, shape.spike_before_s, shape.spike_s,
                           shape.spike_after_s, seed)
    if shape.kind == "concurrency":
        return None
    raise ValueError(f"unknown load shape {shape.kind!r}")


# ---- timeline ----------------------------------------------------------------------------------
def timeline(records: list[RequestRecord], t0: float, bin_s: float = 1.0,
             queue: list[tuple[float, int, int]] | None = None) -> dict:
    """Per bin: offered (scheduled), served (completed ok), rejected (ended in error); queue samples."""
    ends = [r.done - t0 for r in records if r.done is not None]
    horizon = max([r.scheduled for r in records] + ends + [0.0])
    nbins = int(horizon // bin_s) + 1
    offered, served, rejected = [0] * nbins, [0] * nbins, [0] * nbins
    for r in records:
        offered[min(nbins - 1, int(r.scheduled // bin_s))] += 1
        if r.done is not None:
            b = min(nbins - 1, int((r.done - t0) // bin_s))
            (served if r.ok else rejected)[b] += 1
    return {"bin_s": bin_s, "t_s": [i * bin_s for i in range(nbins)], "offered": offered, "served": served,
            "rejected": rejected,
            "queue": {"t_s": [q[0] for q in queue or []], "waiting": [q[1] for q in queue or []],
                      "running": [q[2] for q in queue or []]}}


# ---- progress bar ----------------------------------------------------------------------------
class Progress:
    def __init__(self, total: int, label: str = "", enabled: bool | None = None, out=sys.stderr):
        self.total, self.label, self.out = total, label, out
        self.enabled = out.isatty() if enabled is None else enabled
        self.done = self.errors = 0
        self._last = 0.0

    def update(self, rec: RequestRecord) -> None:
        self.done += 1
        self.errors += 0 if rec.ok else 1
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or self.done == self.total):
            self._last = now
            width = 30
            fill = int(width * self.done / max(1, self.total))
            self.out.write(f"\r{self.label} [{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total}"
                           f"{f' ({self.errors} errors)' if self.errors else ''}")
            if self.done == self.total:
                self.out.write("\n")
            self.out.flush()


# ---- driver ------------------------------------------------------------------------------------
@dataclass
class RunResult:
    records: list[RequestRecord]
    t0: float
    queue: list[tuple[float, int, int]] = field(default_factory=list)   # (t rel, waiting, running)


async def drive(target, specs: list, times: list[float] | None, concurrency: int = 1,
                progress: Progress | None = None, sample_interval_s: float = 0.25) -> RunResult:
    """Run every spec against target (an object with `async generate(spec, rec)` and optionally
    `async queue_depth() -> (waiting, running)`): at its offset in `times`, or `concurrency` at a time."""
    n = len(times) if times is not None else len(specs)
    records = [RequestRecord(i, times[i] if times is not None else 0.0, group=specs[i % len(specs)].group)
               for i in range(n)]
    t0 = time.perf_counter()
    result = RunResult(records, t0)
    stop = asyncio.Event()

    async def one(i: int) -> None:
        rec = records[i]
        rec.sent = time.perf_counter()
        if times is None:
            rec.scheduled = rec.sent - t0
        try:
            await target.generate(specs[i % len(specs)], rec)
        except Exception as e:              # a target bug must not hang the run
            rec.error = rec.error or f"CLIENT_{type(e).__name__}"
        if rec.done is None:
            rec.done = time.perf_counter()
        if progress:
            progress.update(rec)

    async def sampler() -> None:
        qd = getattr(target, "queue_depth", None)
        if qd is None:
            return
        while not stop.is_set():
            try:
                w, r = await qd()
                result.queue.append((time.perf_counter() - t0, w, r))
            except Exception:
                pass
            try:
                await asyncio.wait_for(stop.wait(), sample_interval_s)
            except asyncio.TimeoutError:
                pass

    sampling = asyncio.create_task(sampler())
    if times is not None:
        tasks = []
        for i, t in enumerate(times):
            delay = t0 + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    else:
        it = iter(range(n))

        async def worker() -> None:
            for i in it:
                await one(i)
        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    stop.set()
    await sampling
    return result
