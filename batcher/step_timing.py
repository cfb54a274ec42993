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

`WaitPredictor` (below) uses the same measured steps for admission: how long a new request would
wait for its first token, and when a refused one should come back (batcher/scheduler.py `add`).
"""
from __future__ import annotations

import bisect
import statistics
import time
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


# ---- honest admission: how long a new request would wait for its first token ----------------------
EWMA_ALPHA = 0.2          # weight of the newest step in the rate estimates: follows load within ~5 steps
MIN_PREFILL_SAMPLE = 16   # prefill tokens a step needs before its time says anything about the rate
_EVENTS = 64              # recent admissions / finishes the drain and seat rates are measured over
RETRY_MIN_S = 0.05        # retry-after bounds: no sooner than a step or two, no later than a minute
RETRY_MAX_S = 60.0


class _RateWindow:
    """Events per second over the last few events, measured up to now: a stall lowers it at once.
    The events at the window's first instant only mark its start: a burst filling every free seat
    at once is not a rate the queue behind it will drain at."""

    def __init__(self, size: int = _EVENTS):
        self._times: deque[float] = deque(maxlen=size)

    def note(self, now: float, count: int = 1) -> None:
        for _ in range(min(count, self._times.maxlen or count)):
            self._times.append(now)

    def clear(self) -> None:
        self._times.clear()

    def rate(self, now: float) -> float | None:
        """None until events were seen after the window's first instant (no measurement yet)."""
        times = self._times
        if len(times) < 2:
            return None
        start = times[0]
        after = len(times) - bisect.bisect_right(times, start)
        if after == 0:
            return None
        return after / max(now - start, 1e-3)


class WaitPredictor:
    """Predicts a new request's wait for its first token from what the batcher measured: the
    prefill rate (tokens/s of prompt work a step does beyond a plain decode step), the decode step
    time, how fast waiting requests get a seat (the drain rate) and how fast running ones finish
    (the seat rate). All from step results and admissions, never from constants, so a slow box,
    a long-prompt tenant or a model swap show up within a few steps.

    Without measurements (a fresh batcher) it predicts nothing (None) and admission falls back to
    the queue bound alone: a guess would reject good requests on a fast machine or admit hopeless
    ones on a slow one."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.decode_step_s: float | None = None    # a step without prefill work
        self.prefill_tok_s: float | None = None    # prompt tokens per second of step time
        self._drained = _RateWindow()              # waiting -> running
        self._finished = _RateWindow()             # running -> done (a seat frees)

    # ---- measurements ------------------------------------------------------------------------
    def observe_step(self, prefill_tokens: int, decode_rows: int, execute_s: float) -> None:
        if execute_s <= 0:
            return
        if prefill_tokens == 0:
            if decode_rows:
                self.decode_step_s = _ewma(self.decode_step_s, execute_s)
            return
        if prefill_tokens < MIN_PREFILL_SAMPLE:
            return
        # The decode rows of a mixed step cost about a plain decode step; the rest is prefill.
        base = self.decode_step_s if decode_rows and self.decode_step_s is not None else 0.0
        prefill_s = max(execute_s - base, execute_s * 0.1)
        self.prefill_tok_s = _ewma(self.prefill_tok_s, prefill_tokens / prefill_s)

    def note_admitted(self, count: int = 1) -> None:
        self._drained.note(self.clock(), count)

    def note_finished(self, count: int = 1) -> None:
        self._finished.note(self.clock(), count)

    def note_idle(self) -> None:
        """Nothing running or waiting: the rates restart with the next busy period. Idle time is not
        a stall; counted in, minutes without traffic would predict minutes of wait for the next burst."""
        self._drained.clear()
        self._finished.clear()

    def drain_rate(self) -> float | None:
        """Waiting requests given a seat per second, lately."""
        return self._drained.rate(self.clock())

    # ---- predictions ---------------------------------------------------------------------------
    def queue_wait_s(self, *, tokens_ahead: int, requests_ahead: int, free_seats: int,
                     budget: int) -> float | None:
        """Seconds until a request arriving now starts its prefill: the prompt work queued ahead of
        it, or, when every seat will be taken by then, the time for enough running requests to
        finish, whichever is longer; plus the step in flight. None: not measured yet."""
        rate = self.prefill_tok_s
        if rate is None:
            return None
        step = self.decode_step_s or 0.0
        prefill_ahead = tokens_ahead / rate + -(-tokens_ahead // max(1, budget)) * step
        seat_wait = 0.0
        short = requests_ahead + 1 - free_seats
        if short > 0:
            seats = self._finished.rate(self.clock())
            if seats is not None:
                seat_wait = short / seats
        return max(prefill_ahead, seat_wait) + step

    def prefill_s(self, prompt_tokens: int, budget: int) -> float:
        """Seconds of steps to prefill a prompt of this length (0 before a measurement)."""
        if self.prefill_tok_s is None:
            return 0.0
        return prompt_tokens / self.prefill_tok_s + -(-prompt_tokens // max(1, budget)) * (self.decode_step_s or 0.0)

    def retry_after_s(self, requests_ahead: int, fallback_s: float) -> float:
        """When a refused request should come back: the time the queue ahead of it takes to drain at
        the measured drain rate (`fallback_s`, e.g. the predicted wait, before one was measured)."""
        rate = self.drain_rate()
        est = requests_ahead / rate if rate else fallback_s
        return min(RETRY_MAX_S, max(RETRY_MIN_S, self.decode_step_s or 0.0, est))


def _ewma(old: float | None, sample: float) -> float:
    return sample if old is None else old + EWMA_ALPHA * (sample - old)
