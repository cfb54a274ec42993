"""How long an interactive request may wait for its first token: one rule for the router's admission
gate (router/admission_gate.py) and the batcher's admission (batcher/scheduler.py)."""
from __future__ import annotations


def wait_limit(remaining_s: float | None, max_queue_delay_s: float) -> tuple[float, str]:
    """(seconds, what they come from): the request's time left before its deadline (None: no
    deadline) or the stack's max_queue_delay (0: none), whichever is sooner; 0 when neither bounds it."""
    if remaining_s is not None and (not max_queue_delay_s or remaining_s < max_queue_delay_s):
        return remaining_s, "its deadline"
    return max_queue_delay_s, "max_queue_delay_ms"
