"""`switchyard bench tls`: what TLS on every hop costs, TTFT p50 and ITL p50 with and without it.

Two one-worker stacks run side by side in one invocation, the same in all but `tls`: "plain" and
"tls" (front door TLS, mutual TLS on every service-to-service gRPC hop, NATS over TLS with a user per
service; development certificates made for the run). Rounds alternate which stack goes first
(ABBA) so both see the same background load; every round sends the same seeded requests
(ignore_eos: exactly max_tokens each) at the same concurrency, the client keeping one channel per
stack (as a real client does: the handshake is paid once, not per request). Reported per mode: TTFT
p50/p99, ITL p50/p99 over all requests, and TLS minus plain at p50 (all requests, and the median of
the per-round paired differences, the steadier figure on a shared box). Goal: under 1 ms at p50.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.metrics import itls_from_chunks, pct
from bench.overhead import PROMPTS, sampling

MODES = ("plain", "tls")
GOAL_MS = 1.0


async def one_round(stub, args, tag: str) -> tuple[list[float], list[float]]:
    """`requests` streams, `concurrency` at a time: (TTFTs, ITLs) in ms."""
    from protos.switchyard.v1 import inference_pb2
    from workers.step_codec import sampling_to_proto
    sem = asyncio.Semaphore(args.concurrency)

    async def one(i: int) -> tuple[float, list[float]]:
        req = inference_pb2.GenerateRequest(model=args.model, prompt=PROMPTS[i % len(PROMPTS)],
                                            request_id=f"tls-{tag}-{i}-{time.time_ns()}")
        sampling_to_proto(sampling(i, args.max_tokens), req.sampling)
        async with sem:
            t0 = time.perf_counter()
            chunks: list[tuple[float, int]] = []
            async for r in stub.Generate(req, timeout=600):
                chunks.append((time.perf_counter(), len(r.token_ids)))
        first = next(t for t, n in chunks if n > 0)
        return 1000 * (first - t0), [1000 * x for x in itls_from_chunks(chunks)[args.skip_itl:]]

    res = await asyncio.gather(*(one(i) for i in range(args.requests)))
    return [t for t, _ in res], [x for _, xs in res for x in xs]


async def run_rounds(args, stacks: dict) -> dict:
    import grpc

    from common import tls
    from common.rpc import options
    from protos.switchyard.v1 import inference_pb2_grpc

    chans = {}
    for m, s in stacks.items():
        st = s.tls_state()
        if st:   # the CLI's client certificate, as `switchyard generate` would present it
            creds = tls.channel_credentials(tls.client_settings(st["ca"], st["client_cert"], st["client_key"]))
            chans[m] = grpc.aio.secure_channel(s.router_address, creds, options=options())
        else:
            chans[m] = grpc.aio.insecure_channel(s.router_address, options=options())
    stubs = {m: inference_pb2_grpc.InferenceStub(c) for m, c in chans.items()}
    res = {m: {"ttft": [], "itl": [], "rounds": []} for m in stacks}
    try:
        for m in stacks:   # warm-up: connections, handshakes, the engine's first steps
            await one_round(stubs[m], args, f"warm-{m}")
        for rnd in range(args.rounds):
            order = MODES if rnd % 4 in (0, 3) else MODES[::-1]   # ABBA
            for m in order:
                ttft, itl = await one_round(stubs[m], args, f"{rnd}-{m}")
                res[m]["ttft"] += ttft
                res[m]["itl"] += itl
                res[m]["rounds"].append({"ttft_p50_ms": pct(ttft, 50), "itl_p50_ms": pct(itl, 50)})
    finally:
        for c in chans.values():
            await c.close()
    return res


def summarize(res: dict) -> dict:
    out = {m: {"ttft_p50_ms": pct(r["ttft"], 50), "ttft_p99_ms": pct(r["ttft"], 99),
               "itl_p50_ms": pct(r["itl"], 50), "itl_p99_ms": pct(r["itl"], 99),
               "requests": len(r["ttft"]), "rounds": r["rounds"]} for m, r in res.items()}
    added = {}
    for k in ("ttft_p50_ms", "itl_p50_ms"):
        added[k] = out["tls"][k] - out["plain"][k]
        added[f"{k}_paired_median"] = statistics.median(
            a[k] - b[k] for a, b in zip(out["tls"]["rounds"], out["plain"]["rounds"]))
    added["goal_ms"] = GOAL_MS
    added["meets_goal"] = max(added["ttft_p50_ms_paired_median"], added["itl_p50_ms_paired_median"]) < GOAL_MS
    return {"modes": out, "tls_added": added}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="switchyard bench tls", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default=None, help="worker device (default: the config's, cpu)")
    ap.add_argument("--requests", type=int, default=16, help="requests per round per stack")
    ap.add_argument("--concurrency", type=int, default=1, help="streams at once (1: latency without queueing)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--skip-itl", type=int, default=0, metavar="N", help="drop each stream's first N ITLs")
    ap.add_argument("--num-kv-blocks", type=int, default=512)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--json", dest="json_path", default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    from bench.common import machine_info, write_json
    from common.config import load_config
    from services.launcher import Stack

    work = Path(tempfile.mkdtemp(prefix="switchyard-bench-tls-"))
    base = dict(router_port=0, nats_port=0, kv_manager_port=0, worker_base_port=0, workers=1, model=args.model,
                num_kv_blocks=args.num_kv_blocks, max_model_len=args.max_model_len, device=args.device)
    stacks: dict[str, Stack] = {}
    ok = False
    try:
        for m in MODES:
            stacks[m] = Stack(load_config(None, **base, tls=(m == "tls")), work / m).start()
        res = asyncio.run(run_rounds(args, stacks))
        ok = True
    finally:
        for s in stacks.values():
            s.stop(drain=False)
        if not ok:
            print(f"switchyard bench tls: logs kept in {work}", file=sys.stderr)
    report = {"model": args.model, "device": args.device or "cpu", "requests_per_round": args.requests,
              "concurrency": args.concurrency, "max_tokens": args.max_tokens, "rounds": args.rounds,
              **summarize(res), "machine": machine_info(args.device)}
    m, a = report["modes"], report["tls_added"]
    print(f"{'mode':6} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}   ({args.rounds} rounds x "
          f"{args.requests} requests x {args.max_tokens} tokens, concurrency {args.concurrency}, ABBA)")
    for mode in MODES:
        s = m[mode]
        print(f"{mode:6} {s['ttft_p50_ms']:>9.2f} {s['ttft_p99_ms']:>9.2f} {s['itl_p50_ms']:>8.2f} "
              f"{s['itl_p99_ms']:>8.2f}")
    print(f"TLS adds at p50: TTFT {a['ttft_p50_ms']:+.2f} ms (paired median {a['ttft_p50_ms_paired_median']:+.2f}), "
          f"ITL {a['itl_p50_ms']:+.2f} ms (paired median {a['itl_p50_ms_paired_median']:+.2f}); goal < {GOAL_MS} ms: "
          f"{'met' if a['meets_goal'] else 'NOT met'}")
    if args.json_path:
        write_json(args.json_path, report)
    import shutil
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
