"""The launcher's restart policy (services/supervision.py): backoff and unit state, no processes."""
from __future__ import annotations

from services.supervision import Backoff, Unit


def test_backoff_doubles_from_half_a_second_up_to_ten():
    b = Backoff()
    assert [b.delay(up_for_s=1.0) for _ in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


def test_backoff_starts_over_after_a_minute_of_health():
    b = Backoff()
    for _ in range(5):
        b.delay(up_for_s=2.0)
    assert b.delay(up_for_s=59.0) == 10.0
    assert b.delay(up_for_s=60.0) == 0.5
    assert b.delay(up_for_s=3.0) == 1.0


def test_unit_goes_restarting_then_up_and_counts():
    u = Unit("w0", ["worker-w0", "batcher-w0"], up_since=100.0)
    assert u.snapshot()["state"] == "up" and u.snapshot()["last_exit_code"] is None
    wait = u.died("worker-w0", -9, now=105.0)
    assert wait == 0.5 and u.state == "restarting" and not u.due(now=105.2) and u.due(now=105.5)
    snap = u.snapshot()
    assert snap["last_exit_code"] == -9 and snap["last_exited"] == "worker-w0"
    assert isinstance(snap["restarting_since"], float)
    u.restarted(now=106.0)
    assert u.state == "up" and u.restarts == 1 and u.snapshot()["restarting_since"] is None
    assert u.died("batcher-w0", 1, now=107.0) == 1.0        # died again quickly: longer wait
    u.restarted(now=108.0)
    assert u.died("batcher-w0", 1, now=200.0) == 0.5        # after a minute up: short again
