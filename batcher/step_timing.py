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
HOLD_ALPHA = 0.1          # weight of the newest finished request in the mean seat hold (in steps)
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


class _DecodeSteps:
    """Decode step time by batch size. Measured per power-of-two bucket of rows (EWMA of the time
    and of the rows), interpolated between measured buckets and held flat beyond them: a CPU's step
    grows with its rows (measured: 4 rows 28 ms, 64 rows 330-650 ms), a GPU's hardly at all."""

    def __init__(self):
        self._buckets: dict[int, list[float]] = {}   # rows.bit_length() -> [rows EWMA, seconds EWMA]

    def observe(self, rows: int, execute_s: float) -> None:
        b = self._buckets.get(rows.bit_length())
        if b is None:
            self._buckets[rows.bit_length()] = [float(rows), execute_s]
        else:
            b[0] += EWMA_ALPHA * (rows - b[0])
            b[1] += EWMA_ALPHA * (execute_s - b[1])

    def predict_s(self, rows: int) -> float | None:
        if not self._buckets:
            return None
        lo = hi = None
        for n, t in self._buckets.values():
            if n <= rows and (lo is None or n > lo[0]):
                lo = (n, t)
            if n >= rows and (hi is None or n < hi[0]):
                hi = (n, t)
        if lo is None:
            return hi[1]
        if hi is None or hi[0] == lo[0]:
            return lo[1]
        return lo[1] + (hi[1] - lo[1]) * (rows - lo[0]) / (hi[0] - lo[0])


class WaitPredictor:
    """Predicts a new request's wait for its first token from what the batcher measured: the
    prefill rate (tokens/s of prompt work a step does beyond its decode rows), the decode step time
    by batch size, how many steps a request holds its seat (the mean over finished requests) and
    how long the running ones have held theirs. All from step results, admissions and finishes,
    never from constants, so a slow box, a long-prompt tenant or a model swap show up within a few
    steps.

    The wait is serial work: the prompt work queued ahead plus the decode steps until a seat is free
    for this request. A burst's cohort shows why both matter (300 at once against 64 seats on one
    CPU worker): the seats fill in one step, so the 65th arrival waits for the first cohort's whole
    generation (32 steps of 64 rows, ~13 s), the 129th for two, and every step meanwhile also
    carries the prefills of those admitted before it.

    Without measurements (a fresh batcher) it predicts nothing (None) and admission falls back to
    the queue bound alone: a guess would reject good requests on a fast machine or admit hopeless
    ones on a slow one."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.decode_step_s: float | None = None    # a step without prefill work (any batch size)
        self.prefill_tok_s: float | None = None    # prompt tokens per second of step time
        self.hold_steps: float | None = None       # steps a request holds its seat, admission to finish
        self._holds = 0                            # finished requests the hold was measured on
        self._decode = _DecodeSteps()
        self._steps = 0                            # steps observed: the clock seat holds are counted in
        self._seated: deque[int] = deque()         # step of each running request's admission, oldest first
        self._lanes: list[float] = []              # _seat_steps' sorted seat openings, and what they were for
        self._lanes_key: tuple | None = None
        self._seated_changes = 0                   # bumped whenever _seated changes
        self.mean_prompt_tokens = 0.0              # EWMA over arrivals: what the forecast assumes each brings
        self._drained = _RateWindow()              # waiting -> running
        self._finished = _RateWindow()             # running -> done (a seat frees)

    # ---- measurements ------------------------------------------------------------------------
    def observe_step(self, prefill_tokens: int, decode_rows: int, execute_s: float) -> None:
        self._steps += 1
        if execute_s <= 0:
            return
        if prefill_tokens == 0:
            if decode_rows:
                self.decode_step_s = _ewma(self.decode_step_s, execute_s)
                self._decode.observe(decode_rows, execute_s)
                self._reconcile(decode_rows)
            return
        if prefill_tokens < MIN_PREFILL_SAMPLE:
            return
        # The decode rows of a mixed step cost about a plain decode step of as many rows; the rest is prefill.
        base = (self._decode.predict_s(decode_rows) or 0.0) if decode_rows else 0.0
        prefill_s = max(execute_s - base, execute_s * 0.1)
        self.prefill_tok_s = _ewma(self.prefill_tok_s, prefill_tokens / prefill_s)

    def _reconcile(self, decode_rows: int) -> None:
        """A step with no prefill decoded every running request but those admitted since it was
        planned: seats counted beyond that are requests preempted back to the queue (no finish is
        noted for them); drop the oldest."""
        if len(self._seated) <= decode_rows:
            return
        recent = self._steps - 3   # the step planned at most two results before this one
        newer = 0
        for s in reversed(self._seated):
            if s < recent:
                break
            newer += 1
        for _ in range(len(self._seated) - decode_rows - newer):
            self._seated.popleft()
        self._seated_changes += 1

    def note_arrival(self, prompt_tokens: int) -> None:
        self.mean_prompt_tokens = _ewma(self.mean_prompt_tokens or None, float(prompt_tokens))

    def note_admitted(self, count: int = 1) -> None:
        self._drained.note(self.clock(), count)
        self._seated.extend([self._steps] * count)
        self._seated_changes += 1

    def note_finished(self, count: int = 1) -> None:
        self._finished.note(self.clock(), count)
        self._seated_changes += 1
        for _ in range(count):
            if not self._seated:
                break
            # Paired oldest first: over complete sets the mean hold is exact whatever the pairing.
            held = self._steps - self._seated.popleft()
            # The mean of the first few, then an EWMA: a lone short probe first must not dominate.
            self._holds += 1
            self.hold_steps = _ewma(self.hold_steps, held, max(HOLD_ALPHA, 1.0 / self._holds))

    def note_idle(self) -> None:
        """Nothing running or waiting: the rates restart with the next busy period. Idle time is not
        a stall; counted in, minutes without traffic would predict minutes of wait for the next burst.
        The step times and the seat hold are properties of the model and the traffic: they stay."""
        self._drained.clear()
        self._finished.clear()
        self._seated.clear()
        self._seated_changes += 1

    @property
    def measured(self) -> bool:
        """Predictions are made (queue_wait_s is not None) once a prefill rate was measured."""
        return self.prefill_tok_s is not None

    def drain_rate(self) -> float | None:
        """Waiting requests given a seat per second, lately."""
        return self._drained.rate(self.clock())

    def decode_s(self, rows: int) -> float:
        """Seconds of a decode step of `rows` rows: measured by batch size, and never faster than the
        measured prefill rate would process as many tokens (a step of 64 decode rows is not measured
        until 64 seats are full, which is too late for the burst that fills them)."""
        t = self._decode.predict_s(rows)
        if t is None:
            t = self.decode_step_s or 0.0
        if self.prefill_tok_s:
            t = max(t, rows / self.prefill_tok_s)
        return t

    # ---- predictions ---------------------------------------------------------------------------
    def queue_wait_s(self, *, tokens_ahead: int, requests_ahead: int, free_seats: int,
                     budget: int) -> float | None:
        """Seconds until a request arriving now starts its prefill: the prompt work queued ahead of
        it, plus the decode steps until a seat is free for it (or, with seats free, the steps that
        prompt work is spread over), plus the step in flight. None: not measured yet."""
        rate = self.prefill_tok_s
        if rate is None:
            return None
        running = len(self._seated)
        seats = running + free_seats
        rows = max(1, min(seats, running + requests_ahead + 1))
        step = self.decode_s(rows)
        prefill_steps = -(-tokens_ahead // max(1, budget))
        short = requests_ahead + 1 - free_seats    # seats that must free first, its own included
        seat_s = 0.0
        if short > 0 and seats > 0 and self.hold_steps is not None:
            seat_s = self._seat_steps(short, free_seats, seats) * step
        elif short > 0:                            # no request finished yet: the seat rate, if any
            seat_rate = self._finished.rate(self.clock())
            if seat_rate is not None:
                seat_s = short / seat_rate
        return tokens_ahead / rate + max(seat_s, prefill_steps * step) + self.decode_s(max(1, running))

    def _seat_steps(self, short: int, free_seats: int, seats: int) -> float:
        """Steps until the `short`-th seat opening from now. Each seat is a lane: a running request
        frees it after the rest of its hold (the mean hold less the steps it has run, at least one),
        a free seat after the request that takes it now has held it; then every hold after that."""
        hold = max(1.0, self.hold_steps or 1.0)
        key = (self._steps, self._seated_changes, free_seats, hold)
        if self._lanes_key != key:   # the forecast asks ~20 times per heartbeat with the same seats
            now = self._steps
            self._lanes = sorted([max(1.0, hold - (now - s)) for s in self._seated] + [hold] * free_seats)
            self._lanes_key = key
        rounds, lane = divmod(short - 1, seats)
        return self._lanes[lane] + rounds * hold

    def prefill_s(self, prompt_tokens: int, budget: int) -> float:
        """Seconds of steps to prefill a prompt of this length (0 before a measurement)."""
        if self.prefill_tok_s is None:
            return 0.0
        return prompt_tokens / self.prefill_tok_s + -(-prompt_tokens // max(1, budget)) * (self.decode_step_s or 0.0)

    def retry_after_s(self, requests_ahead: int, fallback_s: float) -> float:
        """When a refused request should come back: the time the queue ahead of it takes to drain.
        `fallback_s` is the caller's queue_wait_s (the queue ahead seated and prefilled, from the
        measured rates); without one, the measured drain rate. The drain rate alone misleads in
        a burst: a cohort seated in one step reads as a fast drain though the next seats open
        only when that cohort finishes."""
        if self.prefill_tok_s is not None:
            est = fallback_s
        else:
            rate = self.drain_rate()
            est = requests_ahead / rate if rate else fallback_s
        return min(RETRY_MAX_S, max(RETRY_MIN_S, self.decode_step_s or 0.0, est))


def _ewma(old: float | None, sample: float, alpha: float = EWMA_ALPHA) -> float:
    return sample if old is None else old + alpha * (sample - old)
