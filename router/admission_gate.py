"""Honest admission at the front door: refuse at once a request no replica can serve in time.

Every batcher predicts how long a new interactive request would wait for its first token
(batcher/step_timing.py `WaitPredictor`) and refuses on arrival one that would miss its deadline or
`max_queue_delay_ms`. That decision alone comes late in a burst: the router takes in, tokenizes,
routes and publishes the whole burst before the batcher sees its tail (measured on the 2-core box:
300 calls at once reach the router over ~0.2 s, ~0.7 ms each), so the 250th request's refusal
waited for the 249 before it. Here the router refuses before tokenizing, from the forecast each
batcher puts in its heartbeat (`Scheduler.forecast`): the predicted wait of the n-th interactive
arrival after that heartbeat, for n = 1, 2, 3, 4, 6, ... 512, and how many more arrivals its queue
bound takes. Between heartbeats the router counts what it sent each replica since the last one
(`ReplicaView.sent_since_beat`, at most its open streams there), so the k-th request of a burst is
judged as arrival k.

The batcher's check on arrival stays the authority (it sees every router's requests and the rates
of this very step); the gate only refuses what every replica's forecast says it would refuse, and
admits when a replica has no forecast (nothing measured yet).
"""
from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass

from batcher.step_timing import RETRY_MAX_S, RETRY_MIN_S  # the batcher's retry-after bounds
from common.replicas import ReplicaView


@dataclass
class Refusal:
    message: str
    retry_after_ms: int


def arrival(view: ReplicaView) -> int:
    """Which arrival after its last heartbeat the next request to this replica would be (1-based):
    what this router sent it since, but no more than its open streams there (requests that ended are
    not ahead of anyone)."""
    return 1 + min(view.sent_since_beat, view.in_flight)


def forecast_wait_s(view: ReplicaView, n: int) -> float | None:
    """The replica's predicted wait for a first token of arrival n: linear between the forecast's
    points, continued along its last segment beyond them. None: no forecast."""
    hb = view.heartbeat
    xs, ys = hb.forecast_arrivals, hb.forecast_wait_ms
    if not xs or len(xs) != len(ys):
        return None
    i = bisect.bisect_left(xs, n)
    if i < len(xs) and xs[i] == n:
        return ys[i] / 1000
    if i == 0:
        return ys[0] / 1000
    if i == len(xs):
        i -= 1
        if i == 0:
            return ys[0] / 1000
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return (y0 + (y1 - y0) * (n - x0) / (x1 - x0)) / 1000


def check(views: Iterable[ReplicaView], limit_s: float, what: str,
          model: str) -> tuple[list[ReplicaView], Refusal | None]:
    """(the replicas that could serve a new request within `limit_s`, None), or ([], the refusal to
    answer) when none could. `what` names the limit in the message ("its deadline",
    "max_queue_delay_ms")."""
    ok: list[ReplicaView] = []
    best: float | None = None     # the least predicted wait among the replicas refusing
    full = 0                      # replicas whose waiting queue is at its bound
    views = list(views)
    for w in views:
        n = arrival(w)
        wait = forecast_wait_s(w, n)
        if w.heartbeat.HasField("queue_room") and n > w.heartbeat.queue_room:
            full += 1
        elif wait is None or wait <= limit_s:
            ok.append(w)
            continue
        if wait is not None and (best is None or wait < best):
            best = wait
    if ok or not views:
        return ok, None
    retry_ms = round(1000 * min(RETRY_MAX_S, max(RETRY_MIN_S, best))) if best is not None else 1000
    if full == len(views):
        return [], Refusal(f"the waiting queue is full on every replica of model {model!r}; retry later", retry_ms)
    return [], Refusal(f"predicted wait for a first token {1000 * best:.0f} ms exceeds {what} "
                       f"({1000 * limit_s:.0f} ms) on every replica of model {model!r}; retry later", retry_ms)
