"""`switchyard bench tenants`: three tenants with weights 1:1:2 on one worker (issue 17).

Phases, on one stack with auth = "required":
1. idle:  B and C (weights 1 and 2) send steady interactive traffic; A sends nothing.
2. flood: the same B/C traffic while A floods at --flood-factor x its quota (long prompts): A's excess
          is refused by quota at the router (RESOURCE_EXHAUSTED, latency measured) and B's / C's TTFT
          p99 is compared with phase 1 (goal: within 1.5x).
3. backlog: three quota-free tenants with the same weights 1:1:2 keep --backlog-depth requests each
          outstanding; their shares of processed tokens (prefill + decode, from the batcher's per-tenant
          counters when it exports them, else the router's per-tenant token counters) are compared with
          the weights (goal: within 10%).
Per tenant and phase: goodput (finished requests/s, output tokens/s), TTFT p50/p99; A's quota rejections
and their latency p50/p99 (goal: < 10 ms). Writes JSON (default benchmarks/results/tenants.json).
"""
from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time

from bench.metrics import percentile as pct

TOKENS = {"A": "bench-tenant-a-token", "B": "bench-tenant-b-token", "C": "bench-tenant-c-token",
          "Abk": "bench-backlog-a-token", "Bbk": "bench-backlog-b-token", "Cbk": "bench-backlog-c-token"}
WEIGHTS = {"A": 1.0, "B": 1.0, "C": 2.0}
WORDS = ("river", "stone", "garden", "orbit", "copper", "signal", "harbor", "lantern", "meadow", "quartz",
         "violet", "timber", "canyon", "ember", "glacier", "pepper")


def tenants_table(a_tpm: int) -> dict:
    t = {"A": {"tokens": [TOKENS["A"]], "weight": 1.0, "tokens_per_minute": a_tpm},
         "B": {"tokens": [TOKENS["B"]], "weight": 1.0},
         "C": {"tokens": [TOKENS["C"]], "weight": 2.0}}
    for k in ("A", "B", "C"):
        t[f"{k}bk"] = {"tokens": [TOKENS[f"{k}bk"]], "weight": WEIGHTS[k]}
    return t


def prompt(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


class Rec:
    def __init__(self):
        self.ttft: list[float] = []
        self.done = 0
        self.out_tokens = 0
        self.rejected: list[float] = []   # seconds from call to RESOURCE_EXHAUSTED
        self.errors: dict[str, int] = {}


MODEL = {"name": "smollm2-135m"}   # set by main (--model)


async def one(stub, rec: Rec, tenant: str, text: str, max_tokens: int, timeout: float = 300.0) -> None:
    import grpc

    from protos.switchyard.v1 import common_pb2, inference_pb2
    req = inference_pb2.GenerateRequest(model=MODEL["name"], prompt=text, sampling=common_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True), service_class="interactive")
    t0 = time.perf_counter()
    first = True
    try:
        async for r in stub.Generate(req, metadata=(("authorization", f"Bearer {TOKENS[tenant]}"),), timeout=timeout):
            if first and (r.token_ids or r.text):
                rec.ttft.append(time.perf_counter() - t0)
                first = False
            rec.out_tokens += len(r.token_ids)
        rec.done += 1
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            rec.rejected.append(time.perf_counter() - t0)
        else:
            key = f"{e.code().name}: {e.details()}"[:160]
            rec.errors[key] = rec.errors.get(key, 0) + 1


async def open_loop(stub, rec: Rec, tenant: str, rate: float, duration: float, words: int, max_tokens: int,
                    seed: int) -> None:
    """Poisson arrivals at `rate`/s for `duration` s (seeded); waits for the last to end."""
    rng = random.Random(seed)
    tasks = []
    end = time.perf_counter() + duration
    try:
        while time.perf_counter() < end:
            tasks.append(asyncio.create_task(one(stub, rec, tenant, prompt(rng, words), max_tokens)))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
    except asyncio.CancelledError:   # stopped early (A's flood): its open requests go too
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def closed_loop(stub, rec: Rec, tenant: str, depth: int, duration: float, words: int, max_tokens: int,
                      seed: int) -> None:
    rng = random.Random(seed)
    end = time.perf_counter() + duration

    async def lane():
        while time.perf_counter() < end:
            await one(stub, rec, tenant, prompt(rng, words), max_tokens)
    await asyncio.gather(*(lane() for _ in range(depth)))


def summary(rec: Rec, seconds: float) -> dict:
    ms = [x * 1000 for x in rec.ttft]
    rej = [x * 1000 for x in rec.rejected]
    return {"finished": rec.done, "goodput_rps": rec.done / seconds, "output_tok_s": rec.out_tokens / seconds,
            "ttft_p50_ms": pct(ms, 50), "ttft_p99_ms": pct(ms, 99), "rejected": len(rec.rejected),
            "reject_p50_ms": pct(rej, 50), "reject_p99_ms": pct(rej, 99), "errors": rec.errors}


def processed_tokens(endpoints: dict[str, str]) -> tuple[dict[str, float], str]:
    """Tokens processed per tenant: the batcher's per-tenant counters when a batcher exports them
    (telemetry/metrics.py TENANT_PROCESSED_TOKENS, else a batcher counter family with a `tenant` label and
    "tenant" and "token" in its name), else the router's per-tenant tokens of finished requests."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from telemetry import metrics as m
    batcher_name = getattr(m, "TENANT_PROCESSED_TOKENS", "")
    found: dict[str, float] = {}
    router: dict[str, float] = {}
    for name, addr in endpoints.items():
        try:
            text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()
        except OSError:
            continue
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                tenant = s.labels.get("tenant")
                if not tenant or not s.name.endswith("_total"):
                    continue
                if fam.name == batcher_name or (not batcher_name and "router" not in name
                                                 and "tenant" in fam.name and "token" in fam.name):
                    found[tenant] = found.get(tenant, 0.0) + s.value
                elif fam.name == m.TENANT_TOKENS:
                    router[tenant] = router.get(tenant, 0.0) + s.value
    return (found, "batcher") if found else (router, "router")


def shares(before: dict[str, float], after: dict[str, float], names: list[str]) -> dict[str, float]:
    d = {n: max(0.0, after.get(n, 0.0) - before.get(n, 0.0)) for n in names}
    total = sum(d.values()) or 1.0
    return {n: v / total for n, v in d.items()}


async def run(args, router: str, endpoints: dict[str, str]) -> dict:
    from common.rpc import channel
    from protos.switchyard.v1 import inference_pb2_grpc
    out: dict = {"config": vars(args)}
    async with channel(router) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        await one(stub, Rec(), "B", "warm up", 2)   # first request pays nothing extra later
        # A's share of the stream of requests: its quota; flooding = flood_factor x that
        a_cost = args.long_words + args.max_tokens
        a_rate = args.flood_factor * args.a_tpm / 60.0 / a_cost
        for phase, flood in (("idle", False), ("flood", True)):
            recs = {k: Rec() for k in "ABC"}
            flooding = None
            if flood:
                # A floods first until its burst allowance (a minute of quota) is spent and the quota
                # refuses it; B and C are measured from then on, while A keeps flooding at its quota.
                flooding = asyncio.create_task(open_loop(stub, recs["A"], "A", a_rate, args.duration * 3,
                                                         args.long_words, args.max_tokens, 3))
                t_wait = time.perf_counter() + args.duration * 2
                while not recs["A"].rejected and time.perf_counter() < t_wait:
                    await asyncio.sleep(0.05)
                out["flood_warmup_s"] = args.duration * 2 - max(0.0, t_wait - time.perf_counter())
                await asyncio.sleep(args.settle)   # the burst A was admitted drains meanwhile
            t0 = time.perf_counter()
            await asyncio.gather(
                open_loop(stub, recs["B"], "B", args.rate, args.duration, args.short_words, args.max_tokens, 1),
                open_loop(stub, recs["C"], "C", args.rate * 2, args.duration, args.short_words, args.max_tokens, 2))
            took = time.perf_counter() - t0
            if flooding is not None:
                flooding.cancel()
                await asyncio.gather(flooding, return_exceptions=True)
            out[phase] = {k: summary(r, took) for k, r in recs.items() if k != "A" or flood}
        names = ["Abk", "Bbk", "Cbk"]
        recs = {k: Rec() for k in names}
        warm = args.duration / 4   # let all three queues fill before counting
        task = asyncio.gather(*(closed_loop(stub, recs[k], k, args.backlog_depth * (2 if k == "Cbk" else 1),
                                            args.duration + warm, args.short_words, args.max_tokens, 10 + i)
                                for i, k in enumerate(names)))
        await asyncio.sleep(warm)
        before, source = processed_tokens(endpoints)
        await asyncio.sleep(args.duration)
        after, _ = processed_tokens(endpoints)
        await task
        sh = shares(before, after, names)
        wsum = sum(WEIGHTS.values())
        out["backlog"] = {"source": source, "shares": {k[0]: v for k, v in sh.items()},
                          "weight_shares": {k: w / wsum for k, w in WEIGHTS.items()},
                          "per_tenant": {k[0]: summary(r, args.duration + warm) for k, r in recs.items()}}
    idle, flood = out["idle"], out["flood"]
    ratio = {k: (flood[k]["ttft_p99_ms"] / idle[k]["ttft_p99_ms"]) if idle[k]["ttft_p99_ms"] and
             flood[k]["ttft_p99_ms"] else None for k in "BC"}
    dev = {k: abs(out["backlog"]["shares"][k] - w / wsum) / (w / wsum) for k, w in WEIGHTS.items()}
    out["goals"] = {
        "ttft_p99_flood_over_idle": ratio,
        "ttft_p99_within_1_5x": all(r is not None and r <= 1.5 for r in ratio.values()),
        "share_deviation": dev, "shares_within_10pct": all(d <= 0.10 for d in dev.values()),
        "a_reject_p99_ms": flood["A"]["reject_p99_ms"],
        "a_rejects_under_10ms": flood["A"]["reject_p99_ms"] is not None and flood["A"]["reject_p99_ms"] < 10.0,
    }
    return out


def print_report(r: dict, file=sys.stdout) -> None:
    for phase in ("idle", "flood"):
        print(f"\n[{phase}] tenant  finished  goodput/s  out tok/s  TTFT p50 ms  TTFT p99 ms  rejected  "
              f"reject p50/p99 ms", file=file)
        for k, s in r[phase].items():
            print(f"  {k:14} {s['finished']:>8} {s['goodput_rps']:>10.2f} {s['output_tok_s']:>10.1f} "
                  f"{_f(s['ttft_p50_ms']):>12} {_f(s['ttft_p99_ms']):>12} {s['rejected']:>9} "
                  f"{_f(s['reject_p50_ms'])}/{_f(s['reject_p99_ms'])}", file=file)
    b = r["backlog"]
    print(f"\n[backlog] processed-token shares ({b['source']} counters) vs weights:", file=file)
    for k, v in b["shares"].items():
        print(f"  {k}: {100 * v:5.1f}%  (weight share {100 * b['weight_shares'][k]:5.1f}%)", file=file)
    g = r["goals"]
    print(f"\ngoals: B/C TTFT p99 flood/idle {g['ttft_p99_flood_over_idle']} (<= 1.5: {g['ttft_p99_within_1_5x']}); "
          f"shares within 10%: {g['shares_within_10pct']}; A rejected p99 {_f(g['a_reject_p99_ms'])} ms "
          f"(< 10: {g['a_rejects_under_10ms']})", file=file)


def _f(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="switchyard bench tenants", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per phase")
    ap.add_argument("--rate", type=float, default=1.0, help="B's requests/s (C sends twice as many)")
    ap.add_argument("--short-words", type=int, default=24, help="B/C prompt length (words)")
    ap.add_argument("--long-words", type=int, default=400, help="A's prompt length (words)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--a-tpm", type=int, default=6000, help="A's tokens_per_minute quota (its share)")
    ap.add_argument("--flood-factor", type=float, default=10.0, help="A sends this many times its quota")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds between A's first refusal and measuring")
    ap.add_argument("--backlog-depth", type=int, default=4, help="outstanding requests per weight unit (phase 3)")
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="the step token budget (also the prefill chunk): smaller keeps A's long prefills from "
                         "holding a step (default: the engine's)")
    ap.add_argument("--json", default="benchmarks/results/tenants.json", metavar="PATH")
    args = ap.parse_args(argv)

    from bench.common import local_stack, machine_info, stack_config, write_json
    MODEL["name"] = args.model
    cfg = stack_config(args.model, workers=1, auth="required", tenants=tenants_table(args.a_tpm), device=args.device,
                       max_num_seqs=args.max_num_seqs, max_model_len=2048,
                       engine={"max_num_batched_tokens": args.max_num_batched_tokens})
    with local_stack(cfg) as stack:
        result = asyncio.run(run(args, stack.router_address, stack.metrics_endpoints()))
    result["machine"] = machine_info(args.device)
    print_report(result)
    errors = {f"{p}/{k}": s["errors"] for p in ("idle", "flood") for k, s in result[p].items() if s["errors"]}
    if errors:
        print(f"\nerrors (not quota refusals): {errors}")
    if args.json:
        print(f"\nwrote {write_json(args.json, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
