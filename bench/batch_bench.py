"""`switchyard bench batch`: durable bulk jobs against online traffic.

1. **Job alone**: an N-item job (Batch/CreateJob) from submit to the last result: items/s and output
   tokens/s, against the **same requests sent online at saturation** (Inference/Generate with
   --online-concurrency in flight).
2. **Job under interactive load**: a seeded Poisson stream of interactive requests (the same shape) for
   --interactive-s seconds, first alone, then beside a running job: interactive TTFT p50/p99 with and
   without the job (goal: p99 at most 1.2x), and the share of the idle capacity the job used
   (goal: at least half). Idle capacity = online saturation items/s minus the interactive rate.

Without --router it starts its own stack on free ports. Sizes are flags; the defaults are the issue's.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

from bench.common import machine_info, stack_config, write_json

WORDS = ("river stone lamp market signal harbor orchard copper lantern meadow tunnel violet engine "
         "garden paper winter bridge silver canyon pocket").split()


def prompts(n: int, words: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    return [f"Item {i}: " + " ".join(rnd.choice(WORDS) for _ in range(words)) for i in range(n)]


def jsonl(texts: list[str], model: str, max_tokens: int, tag: str) -> bytes:
    return "\n".join(json.dumps({"custom_id": f"{tag}-{i}", "method": "POST", "url": "/v1/completions",
                                 "body": {"model": model, "prompt": t, "max_tokens": max_tokens,
                                          "temperature": 0}})
                     for i, t in enumerate(texts)).encode()


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def generate(stub, model: str, prompt: str, max_tokens: int, service_class: str = "") -> tuple[float, int]:
    """(TTFT seconds, output tokens) of one streamed request (greedy, as the job's items: the same outputs)."""
    from protos.switchyard.v1 import common_pb2, inference_pb2
    req = inference_pb2.GenerateRequest(model=model, prompt=prompt, service_class=service_class,
                                        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0))
    t0 = time.perf_counter()
    ttft, n = None, 0
    async for r in stub.Generate(req, timeout=600):
        if ttft is None:
            ttft = time.perf_counter() - t0
        if r.finish_reason:
            n = r.usage.completion_tokens
    return ttft or 0.0, n


async def run_job(batch, data: bytes, poll_s: float = 0.25) -> dict:
    from protos.switchyard.v1 import batch_pb2
    t0 = time.perf_counter()
    j = await batch.CreateJob(batch_pb2.BatchCreateJobRequest(jsonl=data, endpoint="/v1/completions"), timeout=600)
    while j.status not in ("completed", "cancelled", "failed"):
        await asyncio.sleep(poll_s)
        j = await batch.GetJob(batch_pb2.BatchGetJobRequest(job_id=j.id), timeout=60)
    dt = time.perf_counter() - t0
    return {"job": j.id, "status": j.status, "items": j.counts.completed, "failed": j.counts.failed, "seconds": dt,
            "items_per_s": j.counts.completed / dt, "output_tokens_per_s": j.completion_tokens / dt}


async def run_online(stub, model: str, texts: list[str], max_tokens: int, concurrency: int) -> dict:
    it = iter(texts)
    tokens = [0]

    async def worker():
        for t in it:
            n = (await generate(stub, model, t, max_tokens))[1]   # awaited first: `+=` would read a stale sum
            tokens[0] += n
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    dt = time.perf_counter() - t0
    return {"items": len(texts), "seconds": dt, "items_per_s": len(texts) / dt, "output_tokens_per_s": tokens[0] / dt,
            "concurrency": concurrency}


async def run_interactive(stub, model: str, rate: float, seconds: float, words: int, max_tokens: int,
                          seed: int) -> dict:
    rnd = random.Random(seed)
    times, t = [], rnd.expovariate(rate)
    while t < seconds:
        times.append(t)
        t += rnd.expovariate(rate)
    texts = prompts(len(times), words, seed + 1)
    ttfts: list[float] = []
    errors = [0]

    async def one(at: float, text: str, t0: float):
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        try:
            ttfts.append((await generate(stub, model, "Q: " + text, max_tokens))[0] * 1000)
        except Exception:   # noqa: BLE001 - counted; the run goes on
            errors[0] += 1
    t0 = time.perf_counter()
    await asyncio.gather(*(one(a, x, t0) for a, x in zip(times, texts)))
    return {"requests": len(times), "errors": errors[0], "rate": rate, "seconds": seconds,
            "ttft_p50_ms": pct(ttfts, 50), "ttft_p99_ms": pct(ttfts, 99)}


async def bench(args, router: str) -> dict:
    from common.rpc import channel
    from protos.switchyard.v1 import batch_pb2, batch_pb2_grpc, inference_pb2_grpc
    ch = channel(router)
    stub, batch = inference_pb2_grpc.InferenceStub(ch), batch_pb2_grpc.BatchStub(ch)
    texts = prompts(args.items, args.prompt_words, args.seed)
    out: dict = {"machine": machine_info(), "args": vars(args)}
    await generate(stub, args.model, "warm up", 2)
    print(f"job alone: {args.items} items ...", file=sys.stderr, flush=True)
    out["job_alone"] = await run_job(batch, jsonl(texts, args.model, args.output_len, "alone"))
    n_online = args.online_items or args.items
    print(f"online at saturation: {n_online} requests, {args.online_concurrency} in flight ...", file=sys.stderr,
          flush=True)
    out["online_saturation"] = await run_online(stub, args.model, texts[:n_online], args.output_len,
                                                args.online_concurrency)
    out["job_vs_online_items"] = out["job_alone"]["items_per_s"] / out["online_saturation"]["items_per_s"]
    print(f"interactive alone: {args.interactive_rate}/s for {args.interactive_s}s ...", file=sys.stderr, flush=True)
    alone = await run_interactive(stub, args.model, args.interactive_rate, args.interactive_s, args.prompt_words,
                                  args.output_len, args.seed)
    print("interactive beside a job ...", file=sys.stderr, flush=True)
    mixed_texts = prompts(args.mixed_items, args.prompt_words, args.seed + 7)
    job = await batch.CreateJob(batch_pb2.BatchCreateJobRequest(
        jsonl=jsonl(mixed_texts, args.model, args.output_len, "mixed"), endpoint="/v1/completions"), timeout=600)
    await asyncio.sleep(args.job_head_start_s)   # the job's runner at full concurrency first
    before = await batch.GetJob(batch_pb2.BatchGetJobRequest(job_id=job.id), timeout=60)
    t0 = time.perf_counter()
    mixed = await run_interactive(stub, args.model, args.interactive_rate, args.interactive_s, args.prompt_words,
                                  args.output_len, args.seed)
    window = time.perf_counter() - t0
    after = await batch.GetJob(batch_pb2.BatchGetJobRequest(job_id=job.id), timeout=60)
    await batch.CancelJob(batch_pb2.BatchCancelJobRequest(job_id=job.id), timeout=60)
    job_rate = (after.counts.completed - before.counts.completed) / window
    idle = max(1e-9, out["online_saturation"]["items_per_s"] - args.interactive_rate)
    out["interactive_alone"] = alone
    out["interactive_with_job"] = dict(mixed, job_items_per_s=job_rate, job_done_in_window=after.counts.completed
                                       - before.counts.completed, job_still_pending=after.counts.pending)
    out["ttft_p99_ratio"] = mixed["ttft_p99_ms"] / alone["ttft_p99_ms"] if alone["ttft_p99_ms"] else float("nan")
    out["job_share_of_idle_capacity"] = job_rate / idle
    out["goals"] = {"ttft_p99_ratio<=1.2": out["ttft_p99_ratio"] <= 1.2,
                    "job_share_of_idle>=0.5": out["job_share_of_idle_capacity"] >= 0.5,
                    "job_outlasted_window": after.counts.pending > 0}
    await ch.close()
    return out


def report(r: dict) -> str:
    a, o = r["job_alone"], r["online_saturation"]
    ia, im = r["interactive_alone"], r["interactive_with_job"]
    return "\n".join([
        f"job alone        : {a['items']} items in {a['seconds']:.1f}s = {a['items_per_s']:.2f} items/s, "
        f"{a['output_tokens_per_s']:.1f} output tok/s ({a['failed']} failed)",
        f"online saturated : {o['items']} requests in {o['seconds']:.1f}s = {o['items_per_s']:.2f} req/s, "
        f"{o['output_tokens_per_s']:.1f} output tok/s (concurrency {o['concurrency']})",
        f"job / online     : {r['job_vs_online_items']:.2f}x items/s",
        f"interactive alone: TTFT p50 {ia['ttft_p50_ms']:.1f} ms, p99 {ia['ttft_p99_ms']:.1f} ms "
        f"({ia['requests']} requests, {ia['errors']} errors)",
        f"with the job     : TTFT p50 {im['ttft_p50_ms']:.1f} ms, p99 {im['ttft_p99_ms']:.1f} ms "
        f"({im['requests']} requests, {im['errors']} errors); job {im['job_items_per_s']:.2f} items/s",
        f"TTFT p99 ratio   : {r['ttft_p99_ratio']:.2f}x (goal <= 1.2); job share of idle capacity "
        f"{r['job_share_of_idle_capacity']:.2f} (goal >= 0.5)",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="switchyard bench batch", description=__doc__.splitlines()[0])
    ap.add_argument("--router", default=None, help="a running router (default: start a stack on free ports)")
    ap.add_argument("--config", default=None, help="stack config for the stack this starts")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--items", type=int, default=2000, help="items of the job alone")
    ap.add_argument("--online-items", type=int, default=0, help="online requests at saturation (0: --items)")
    ap.add_argument("--online-concurrency", type=int, default=32)
    ap.add_argument("--batch-concurrency", type=int, default=None, help="the runner's items in flight "
                                                                       "(config batch_concurrency)")
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--interactive-rate", type=float, default=2.0, help="interactive requests/s (Poisson)")
    ap.add_argument("--interactive-s", type=float, default=60.0, help="seconds of interactive load, per phase")
    ap.add_argument("--mixed-items", type=int, default=2000, help="items of the job beside interactive load "
                                                                 "(enough to outlast the window)")
    ap.add_argument("--job-head-start-s", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.router:
        r = asyncio.run(bench(args, args.router))
    else:
        from bench.common import local_stack
        over = {"workers": args.workers}
        if args.batch_concurrency:
            over["batch_concurrency"] = args.batch_concurrency
        with local_stack(stack_config(args.model, args.config, **over)) as stack:
            r = asyncio.run(bench(args, stack.router_address))
    print(report(r))
    if args.json:
        write_json(args.json, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
