"""`switchyard bench serve` against a real stack it starts itself (a few requests, two rates), and
`bench compare --batching` in-process: the JSON has every field, the plots are PNGs.

Both use the built-in random-weight tiny Llama (SmolLM2's tokenizer) so they fit the time budget
of a loaded 2-core box; the code path is the same as for SmolLM2."""
from __future__ import annotations

import json

from services.cli import main as cli

PNG = b"\x89PNG\r\n\x1a\n"
SUMMARIES = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
FIELDS = ("output_tok_s", "request_per_s", "goodput_req_s", "errors", "cost_usd_per_1k_output_tokens",
          "break_even_tokens_per_month", "machine")


def _pngs(d):
    files = sorted(d.glob("*.png"))
    for f in files:
        data = f.read_bytes()
        assert data[:8] == PNG and len(data) > 2000, f
    return {f.name for f in files}


def test_bench_serve_against_a_real_stack(tmp_path):
    out, plots = tmp_path / "serve.json", tmp_path / "plots"
    rc = cli(["bench", "serve", "--model", "random:tiny", "--load", "sweep", "--sweep-rates", "6,12",
              "--num-requests", "3",
              "--input-len", "8-16", "--output-len", "2-3", "--num-kv-blocks", "128", "--max-model-len", "256",
              "--slo-ttft-ms", "60000", "--itl-slo-ms", "60000", "--gpu-usd-per-hour", "3.6", "--no-progress",
              "--json", str(out), "--plot", str(plots)])
    assert rc == 0
    rep = json.loads(out.read_text())
    for k in SUMMARIES:
        assert set(rep[k]) >= {"p50", "p90", "p95", "p99", "mean"}, k
        assert all(isinstance(rep[k][q], float) for q in ("p50", "p99", "mean")), (k, rep[k])
    for k in FIELDS:
        assert k in rep, k
    assert rep["errors"] == {} and rep["completed"] == 3
    assert rep["output_tok_s"] > 0 and rep["request_per_s"] > 0 and rep["goodput_req_s"] > 0
    assert rep["cost_usd_per_1k_output_tokens"] > 0
    assert rep["target"] == "stack" and len(rep["runs"]) == 2
    assert [r["load"]["rate"] for r in rep["runs"]] == [6.0, 12.0]
    # latency as users feel it: ITL by position (outputs of 2-3 tokens: only bucket 2-10 has data),
    # perceived tok/s, and each request's E2E split from the batcher's usage times
    pos = rep["itl_by_position_ms"]
    assert list(pos["buckets"]) == ["2-10", "11-50", "51-100", "101-200", "201+"]
    assert pos["buckets"]["2-10"]["count"] >= 3 and isinstance(pos["buckets"]["2-10"]["p99"], float)
    assert pos["buckets"]["11-50"]["count"] == 0 and pos["over_slo"] == [] and pos["itl_slo_ms"] == 60000
    assert rep["perceived_tok_s"]["count"] == 3 and rep["perceived_tok_s"]["p10"] > 0
    split = rep["e2e_split_ms"]
    assert split["requests"] == 3 and split["traced"] == 0
    for part in ("queue", "prefill", "decode", "rest"):
        assert isinstance(split[part]["p50"], float), part
    assert 0 < split["inference_ratio"]["p50"] <= 1
    assert len(rep["requests"]) == 3
    for row in rep["requests"]:
        parts = [row["split"][p] or 0.0 for p in ("client_network", "router", "nats", "queue", "prefill",
                                                   "decode", "rest")]
        assert abs(sum(parts) - row["e2e_ms"]) < 1e-6 and row["request_id"].startswith("bench-")
    assert _pngs(plots) == {"latency_cdf.png", "latency_vs_rate.png", "throughput_vs_rate.png", "timeline.png",
                            "itl_by_position.png"}


def test_bench_compare_batching_inproc(tmp_path):
    out, plots = tmp_path / "compare.json", tmp_path / "plots"
    rc = cli(["bench", "compare", "--batching", "--model", "random:tiny", "--num-requests", "3",
              "--input-len", "8-16", "--output-len", "2-4",
              "--batch-size", "2", "--request-rate", "20", "--num-kv-blocks", "64", "--max-model-len", "256",
              "--no-progress", "--json", str(out), "--plot", str(plots)])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["continuous_over_static_throughput"] > 0
    for v in ("static", "continuous"):
        assert rep["batching"][v]["completed"] == 3
        assert rep["batching"][v]["output_tokens"] == rep["batching"]["static"]["output_tokens"]
        assert rep["batching"][v]["ttft_ms"]["p99"] > 0
        assert rep["batching"][v]["perceived_tok_s"]["count"] == 3
        assert rep["batching"][v]["e2e_split_ms"]["prefill"]["p50"] is not None   # the engine's own times
    assert _pngs(plots) == {"compare_batching.png", "compare_batching_cdf.png", "compare_batching_itl_by_position.png"}
