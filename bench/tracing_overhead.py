"""`switchyard bench tracing`: throughput and p99 TTFT with tracing off, file exporter, 100% OTLP export.

Three one-worker stacks run side by side in one invocation: tracing off (no endpoint, no file),
`--trace-file` (OTLP JSON lines), and 100% sampling exported over OTLP gRPC to a minimal collector
in its own process (telemetry/otlp_sink.py, as Jaeger would receive it). Rounds rotate over the
stacks so each sees the same background load on a shared box; every round sends the same N
concurrent seeded streams (ignore_eos, so each yields exactly max_tokens). Reported per mode:
output tokens/s (median over rounds of round tokens / round wall time), TTFT p50/p99 over all
requests, and the ratios to "off" (the figure that matters on a noisy machine).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.overhead import PROMPTS, pct, sampling

MODES = ["off", "file", "otlp"]
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """user+system CPU seconds used so far by these processes (contention-insensitive cost)."""
    total = 0
    for pid in pids:
        try:
            f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / _TICK


async def one_round(stub, args, tag: str) -> tuple[float, int, list[float]]:
    from protos.switchyard.v1 import inference_pb2
    from workers.step_codec import sampling_to_proto

    async def one(i: int) -> tuple[float, int]:
        req = inference_pb2.GenerateRequest(model=args.model, prompt=PROMPTS[i % len(PROMPTS)],
                                            request_id=f"tb-{tag}-{i}-{time.time_ns()}")
        sampling_to_proto(sampling(i, args.max_tokens), req.sampling)
        t0 = time.perf_counter()
        ttft, n = None, 0
        async for r in stub.Generate(req, timeout=600):
            if ttft is None:
                ttft = time.perf_counter() - t0
            n += len(r.token_ids)
        return ttft, n

    t0 = time.perf_counter()
    res = await asyncio.gather(*(one(i) for i in range(args.streams)))
    wall = time.perf_counter() - t0
    return wall, sum(n for _, n in res), [1000 * t for t, _ in res]


async def run_rounds(args, routers: dict[str, str], pids: dict[str, list[int]]) -> dict:
    import grpc

    from common.rpc import options
    from protos.switchyard.v1 import inference_pb2_grpc

    chans = {m: grpc.aio.insecure_channel(a, options=options()) for m, a in routers.items()}
    stubs = {m: inference_pb2_grpc.InferenceStub(c) for m, c in chans.items()}
    res = {m: {"tps": [], "ttft": [], "cpu_s": 0.0, "tokens": 0} for m in routers}
    try:
        for m in routers:
            await one_round(stubs[m], args, f"warm-{m}")
        for rnd in range(args.rounds):
            order = MODES[rnd % 3:] + MODES[:rnd % 3]   # rotate who goes first
            for m in order:
                c0 = cpu_seconds(pids[m])
                wall, tokens, ttfts = await one_round(stubs[m], args, f"{rnd}-{m}")
                res[m]["cpu_s"] += cpu_seconds(pids[m]) - c0
                res[m]["tokens"] += tokens
                res[m]["tps"].append(tokens / wall)
                res[m]["ttft"].extend(ttfts)
    finally:
        for c in chans.values():
            await c.close()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="switchyard bench tracing", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--num-kv-blocks", type=int, default=512)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--json", dest="json_path", default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    from common.config import load_config
    from services.launcher import Stack

    env_backup = {k: os.environ.pop(k, None) for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "SWITCHYARD_TRACE_FILE")}
    work = Path(tempfile.mkdtemp(prefix="switchyard-bench-tracing-"))
    sink = subprocess.Popen([sys.executable, "-m", "telemetry.otlp_sink"], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    endpoint = sink.stdout.readline().strip()
    trace_file = work / "trace.jsonl"
    base = dict(router_port=0, nats_port=0, kv_manager_port=0, worker_base_port=0, workers=1, model=args.model,
                num_kv_blocks=args.num_kv_blocks, max_model_len=args.max_model_len)
    modes = {"off": {}, "file": {"trace_file": str(trace_file)}, "otlp": {"otlp_endpoint": endpoint,
                                                                      "trace_sample_ratio": 1.0}}
    stacks: dict[str, Stack] = {}
    try:
        for m, extra in modes.items():
            stacks[m] = Stack(load_config(None, **base, **extra), work / m).start()
        res = asyncio.run(run_rounds(args, {m: s.router_address for m, s in stacks.items()},
                                     {m: [c.pid for c in s.children] for m, s in stacks.items()}))
    finally:
        for s in stacks.values():
            s.stop(drain=False)
        sink.terminate()
        tail = sink.communicate(timeout=10)[0].strip()
        for k, v in env_backup.items():
            if v is not None:
                os.environ[k] = v

    summary = {}
    for m in MODES:
        tps, ttft = res[m]["tps"], res[m]["ttft"]
        summary[m] = {"tokens_per_s": statistics.median(tps), "tokens_per_s_rounds": tps,
                      "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99), "requests": len(ttft),
                      "stack_cpu_s_per_1k_tokens": 1000 * res[m]["cpu_s"] / max(1, res[m]["tokens"])}
    for m in ("file", "otlp"):
        summary[m]["throughput_ratio_vs_off"] = summary[m]["tokens_per_s"] / summary["off"]["tokens_per_s"]
        summary[m]["ttft_p99_ratio_vs_off"] = summary[m]["ttft_p99_ms"] / summary["off"]["ttft_p99_ms"]
        summary[m]["cpu_ratio_vs_off"] = (summary[m]["stack_cpu_s_per_1k_tokens"]
                                          / summary["off"]["stack_cpu_s_per_1k_tokens"])
        # Paired: the same round's off run is the reference (same background load, minutes apart at most).
        summary[m]["throughput_ratio_paired_median"] = statistics.median(
            a / b for a, b in zip(res[m]["tps"], res["off"]["tps"]))
    spans_file = sum(1 for _ in open(trace_file)) if trace_file.exists() else 0
    report = {"model": args.model, "streams": args.streams, "max_tokens": args.max_tokens, "rounds": args.rounds,
              "modes": summary, "otlp_sink": tail, "trace_file_lines": spans_file}
    print(f"{'mode':6} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'tok/s vs off':>13} {'p99 vs off':>11}   "
          f"({args.streams} streams x {args.max_tokens} tokens, {args.rounds} rounds each, interleaved)")
    for m in MODES:
        s = summary[m]
        r1 = s.get("throughput_ratio_vs_off", 1.0)
        r2 = s.get("ttft_p99_ratio_vs_off", 1.0)
        print(f"{m:6} {s['tokens_per_s']:>8.1f} {s['ttft_p50_ms']:>9.1f} {s['ttft_p99_ms']:>9.1f} "
              f"{r1:>13.3f} {r2:>11.3f}")
    print("stack CPU seconds per 1K tokens (all its processes): " + ", ".join(
        f"{m} {summary[m]['stack_cpu_s_per_1k_tokens']:.2f}" for m in MODES)
        + " -> vs off: " + ", ".join(f"{m} {summary[m]['cpu_ratio_vs_off']:.3f}" for m in ("file", "otlp")))
    print("paired per-round throughput ratio (median): " + ", ".join(
        f"{m} {summary[m]['throughput_ratio_paired_median']:.3f}" for m in ("file", "otlp")))
    print(f"otlp collector: {tail}; trace file: {spans_file} export batches")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
