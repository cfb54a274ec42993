"""`switchyard bench overhead`: what router + NATS + batcher + worker add over the bare engine.

The same seeded requests (N concurrent streams, default 8) run twice in one invocation: through the
in-process Engine (add_request/step, timestamps taken as each step returns) and through the full
stack over gRPC (timestamps as each streamed response arrives). Prints TTFT and inter-token latency
p50/p99 of both and the difference ("added"). Goal on a 2-core box: added TTFT p99 <= 5 ms,
added ITL p50 <= 0.5 ms at 8 streams. Also, per stack request, its TTFT minus the engine's own
prefill time reported in its usage ("platform"): the same overhead measured without comparing two
noisy runs (a burst's TTFT is one prefill step, so a round gives one TTFT sample per side).
And the transport floor ("grpc floor", bench/grpc_floor.py): the same client and bursts against
a no-op Generate server, i.e. what grpc.aio alone costs on this machine.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from bench.common import local_stack, machine_info, stack_config, write_json
from bench.metrics import pct

PROMPTS = ["The capital of France is", "def quicksort(arr):", "Once upon a time, in a quiet village,",
           "The three laws of thermodynamics are", "A haiku about autumn:", "SELECT name FROM users WHERE",
           "The mitochondria is", "To make a cup of tea, first"]


@dataclass
class Trace:
    submit: float
    arrivals: list[float] = field(default_factory=list)   # one per token
    prefill_ms: float | None = None    # stack only: the batcher's first-schedule -> first-token time (usage)

    @property
    def ttft(self) -> float:
        return self.arrivals[0] - self.submit

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]


def summarize(traces: list[Trace]) -> dict:
    ttft = [t.ttft * 1000 for t in traces if t.arrivals]
    itl = [x * 1000 for t in traces for x in t.itls]
    out = {"ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99), "itl_p50_ms": pct(itl, 50),
           "itl_p99_ms": pct(itl, 99), "itl_mean_ms": statistics.fmean(itl) if itl else float("nan"),
           "requests": len(traces), "tokens": sum(len(t.arrivals) for t in traces)}
    # Paired, per request: the client's TTFT minus the engine's own prefill of that request (as
    # the batcher measured it). What is left is router, NATS, admission and relay time - the
    # platform's TTFT overhead without the step-to-step noise of comparing two separate runs.
    plat = [t.ttft * 1000 - t.prefill_ms for t in traces if t.arrivals and t.prefill_ms is not None]
    if plat:
        out.update(platform_ttft_p50_ms=pct(plat, 50), platform_ttft_p99_ms=pct(plat, 99))
    return out


def sampling(i: int, max_tokens: int):
    from workers.engine.sampling_params import SamplingParams
    # ignore_eos: every stream produces exactly max_tokens, in both runs.
    return SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.95, seed=1000 + i, ignore_eos=True)


class EngineRunner:
    """The bare engine in this process: add_request/step, timestamp as each step returns."""

    def __init__(self, args):
        from batcher.engine import Engine
        self.args = args
        # Steps run on a one-thread executor, exactly as the worker runs ModelRunner.execute: on a
        # busy 2-core box torch on the main thread measured ~4x slower than on a helper thread,
        # which would make the bare engine look slower than the stack.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-engine")
        self.eng = self._executor.submit(Engine.from_model, args.model, num_kv_blocks=args.num_kv_blocks,
                                         max_model_len=args.max_model_len).result()
        self._executor.submit(self.eng.warmup).result()

    def round(self, rnd: int) -> list[Trace]:
        return self._executor.submit(self._round, rnd).result()

    def _round(self, rnd: int) -> list[Trace]:
        eng, args = self.eng, self.args
        by_id: dict[str, Trace] = {}
        for i in range(args.streams):
            rid = f"r{rnd}-{i}"
            by_id[rid] = Trace(time.perf_counter())
            eng.add_request(PROMPTS[i % len(PROMPTS)], sampling(i, args.max_tokens), request_id=rid)
        while eng.has_unfinished():
            outs = eng.step()
            now = time.perf_counter()
            for o in outs:
                by_id[o.request_id].arrivals.extend([now] * len(o.new_token_ids))
        return list(by_id.values())


async def stack_round(stub, args, rnd: int) -> list[Trace]:
    from protos.switchyard.v1 import inference_pb2
    from workers.step_codec import sampling_to_proto

    async def one(i: int) -> Trace:
        req = inference_pb2.GenerateRequest(model=args.model, prompt=PROMPTS[i % len(PROMPTS)],
                                            request_id=f"bench-{rnd}-{i}-{time.time_ns()}")
        sampling_to_proto(sampling(i, args.max_tokens), req.sampling)
        tr = Trace(time.perf_counter())
        async for r in stub.Generate(req, timeout=600):
            now = time.perf_counter()
            tr.arrivals.extend([now] * len(r.token_ids))
            if r.HasField("usage"):
                tr.prefill_ms = r.usage.prefill_ms
        return tr

    return list(await asyncio.gather(*(one(i) for i in range(args.streams))))


async def run_all(args, router: str, floor: str) -> tuple[list[Trace], list[Trace], list[Trace]]:
    """Alternate engine, stack and floor rounds so all see the same background load on a shared box."""
    from common.rpc import channel
    from protos.switchyard.v1 import inference_pb2_grpc

    engine = EngineRunner(args)
    eng_traces: list[Trace] = []
    stack_traces: list[Trace] = []
    floor_traces: list[Trace] = []
    async with channel(router) as ch, channel(floor) as floor_ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        floor_stub = inference_pb2_grpc.InferenceStub(floor_ch)
        await stack_round(stub, args, -1)  # warm the paths (connections, first-step costs)
        await stack_round(floor_stub, args, -1)
        for rnd in range(args.rounds):
            eng_traces.extend(engine.round(rnd))
            stack_traces.extend(await stack_round(stub, args, rnd))
            floor_traces.extend(await stack_round(floor_stub, args, rnd))
    return eng_traces, stack_traces, floor_traces


def run(args) -> tuple[list[Trace], list[Trace], list[Trace]]:
    import tempfile
    from pathlib import Path

    from bench.grpc_floor import floor_server
    with tempfile.TemporaryDirectory(prefix="sy-floor-") as logs, floor_server(Path(logs)) as floor:
        if args.router:
            return asyncio.run(run_all(args, args.router, floor))
        cfg = stack_config(args.model, workers=1, num_kv_blocks=args.num_kv_blocks,
                           max_model_len=args.max_model_len, step_pipeline=not args.no_pipeline)
        with local_stack(cfg) as stack:
            return asyncio.run(run_all(args, stack.router_address, floor))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="switchyard bench overhead", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=8, help="bursts of --streams requests, per side")
    ap.add_argument("--num-kv-blocks", type=int, default=512)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--router", default=None, help="measure an already running stack instead of starting one")
    ap.add_argument("--no-pipeline", action="store_true",
                    help="batcher and worker in lockstep (step_pipeline = false), to see what pipelining saves")
    ap.add_argument("--json", dest="json_path", default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    eng_traces, stack_traces, floor_traces = run(args)
    engine, stack, floor = summarize(eng_traces), summarize(stack_traces), summarize(floor_traces)
    added = {k.replace("_ms", "_added_ms"): stack[k] - engine[k]
             for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")}
    report = {"machine": machine_info(), "model": args.model, "streams": args.streams, "max_tokens": args.max_tokens,
              "rounds": args.rounds, "step_pipeline": not args.no_pipeline,
              "engine": engine, "stack": stack, "added": added,
              "grpc_floor": {k: floor[k] for k in ("ttft_p50_ms", "ttft_p99_ms")}}
    print(f"{'':10} {'TTFT p50':>10} {'TTFT p99':>10} {'ITL p50':>10} {'ITL p99':>10}   (ms, {args.streams} streams)")
    for name, s in (("engine", engine), ("stack", stack)):
        print(f"{name:10} {s['ttft_p50_ms']:>10.2f} {s['ttft_p99_ms']:>10.2f} {s['itl_p50_ms']:>10.2f} "
              f"{s['itl_p99_ms']:>10.2f}")
    print(f"{'added':10} {added['ttft_p50_added_ms']:>10.2f} {added['ttft_p99_added_ms']:>10.2f} "
          f"{added['itl_p50_added_ms']:>10.2f} {added['itl_p99_added_ms']:>10.2f}")
    if "platform_ttft_p50_ms" in stack:
        print(f"{'platform':10} {stack['platform_ttft_p50_ms']:>10.2f} {stack['platform_ttft_p99_ms']:>10.2f}"
              f"   (stack TTFT minus the engine's own prefill, per request)")
    print(f"{'grpc floor':10} {floor['ttft_p50_ms']:>10.2f} {floor['ttft_p99_ms']:>10.2f}"
          f"   (TTFT of a no-op Generate server: the same client and bursts, grpc.aio alone)")
    if args.json_path:
        write_json(args.json_path, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
