"""`bench chaos --soak`: the RSS series of a process is told apart as a plateau or a leak
(bench/chaos.py rss_trend): growth from the start, growth after the warm-up, and the least-squares
slope per hour after it."""
from __future__ import annotations

import pytest

from bench.chaos import rss_trend

MIB = 2**20


def test_a_heap_that_settles_in_the_warm_up_is_not_a_leak():
    # +4 MiB in the first two minutes (a Go heap growing to its working size), then flat for an hour
    series = [(t, (17 + min(t, 120) / 30) * MIB) for t in range(0, 3601, 30)]
    tr = rss_trend(series, warmup_s=360)
    assert tr["growth_pct"] == pytest.approx(100 * 4 / 17)             # what start -> end alone says
    assert tr["growth_after_warmup_pct"] == pytest.approx(0.0)
    assert tr["slope_pct_per_h"] == pytest.approx(0.0, abs=1e-9)


def test_a_steady_leak_shows_as_its_slope_per_hour():
    series = [(t, 100 * MIB + t * 1000) for t in range(0, 3601, 30)]   # 3.6 MB an hour
    tr = rss_trend(series, warmup_s=360)
    assert tr["slope_bytes_per_h"] == pytest.approx(3.6e6)
    assert tr["slope_pct_per_h"] == pytest.approx(100 * 3.6e6 / (100 * MIB + 360_000))
    assert tr["growth_after_warmup_pct"] > 0


def test_missing_samples_are_skipped_and_too_few_say_so():
    assert rss_trend([(0, None), (30, 5 * MIB)], warmup_s=0) == {"samples": 1}
    tr = rss_trend([(0, 5 * MIB), (30, None), (60, 5 * MIB), (90, 5 * MIB)], warmup_s=0)
    assert tr["samples"] == 3 and tr["growth_pct"] == 0.0
