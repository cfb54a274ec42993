"""`switchyard bench tls`'s figures: TLS minus plain at p50, over all requests and paired per round."""
from __future__ import annotations

from bench.tls_bench import summarize


def rounds(ttfts: list[float], itls: list[float]) -> dict:
    return {"ttft": ttfts, "itl": itls,
            "rounds": [{"ttft_p50_ms": t, "itl_p50_ms": i} for t, i in zip(ttfts, itls)]}


def test_tls_added_is_tls_minus_plain_and_the_goal_reads_the_paired_medians():
    res = {"plain": rounds([10.0, 20.0, 30.0], [5.0, 5.0, 5.0]),
           "tls": rounds([10.5, 20.4, 33.0], [5.2, 5.1, 5.3])}
    s = summarize(res)["tls_added"]
    assert abs(s["ttft_p50_ms"] - 0.4) < 1e-9                 # medians 20.4 - 20.0
    assert abs(s["ttft_p50_ms_paired_median"] - 0.5) < 1e-9   # per round +0.5, +0.4, +3.0
    assert abs(s["itl_p50_ms_paired_median"] - 0.2) < 1e-9
    assert s["meets_goal"]
    res["tls"] = rounds([12.0, 22.0, 32.0], [5.0, 5.0, 5.0])
    assert not summarize(res)["tls_added"]["meets_goal"]
