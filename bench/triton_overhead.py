"""`switchyard bench triton`: added latency of the Triton-protocol front door and of the Triton
backend hop, against the native path, in one run.

Starts stack B (our engine, `--triton-port`) and stack A (a pass-through worker whose Triton
backend points at B's front door), then sends the same greedy requests, one at a time and
interleaved, on three paths:
  native        Inference/Generate on B's router
  triton_front  tritonclient.grpc.aio ModelStreamInfer on B's --triton-port  (front door + native)
  triton_hop    Inference/Generate on A's router  (A's router+batcher -> Triton backend -> B's front -> B)
and prints TTFT p50/p99 and ITL p50 per path and each path's difference to native.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np

from bench.metrics import pct

PROMPT = "Write one sentence about railway switches:"


def pct_ms(xs: list[float], p: float) -> float:
    return pct([x * 1000 for x in xs], p)


async def native(router: str, model: str, max_tokens: int):
    import grpc

    from common.rpc import options
    from protos.switchyard.v1 import common_pb2, inference_pb2, inference_pb2_grpc
    req = inference_pb2.GenerateRequest(model=model, prompt=PROMPT, sampling=common_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    async with grpc.aio.insecure_channel(router, options=options()) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        await stub.ListModels(inference_pb2.ListModelsRequest())   # connected before timing
        t0 = time.perf_counter()
        times = []
        async for r in stub.Generate(req, timeout=120):
            if r.text or r.token_ids:
                times.append(time.perf_counter())
    return t0, times


async def triton(addr: str, model: str, max_tokens: int):
    from workers.backends.tritongrpc import load
    tg, aio = load()[:2]
    ins = []
    for name, dt, val in (("text_input", "BYTES", np.array([PROMPT.encode()], dtype=object)),
                          ("stream", "BOOL", np.array([True])),
                          ("max_tokens", "INT32", np.array([max_tokens], dtype=np.int32)),
                          ("temperature", "FP32", np.array([0.0], dtype=np.float32))):
        t = tg.InferInput(name, [1], dt)
        t.set_data_from_numpy(val)
        ins.append(t)
    sp = tg.InferInput("sampling_parameters", [1], "BYTES")
    sp.set_data_from_numpy(np.array([json.dumps({"ignore_eos": True}).encode()], dtype=object))
    ins.append(sp)
    c = aio.InferenceServerClient(addr)
    await c.is_server_live()

    async def reqs():
        yield {"model_name": model, "inputs": ins}

    t0 = time.perf_counter()
    times = []
    it = c.stream_infer(reqs())
    async for result, error in it:
        if error is not None:
            raise RuntimeError(str(error))
        if result.as_numpy("text_output") is not None and result.as_numpy("text_output")[0]:
            times.append(time.perf_counter())
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    it.cancel()
    await c.close()
    return t0, times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="switchyard bench triton", description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20, help="requests per path (interleaved)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    from contextlib import ExitStack

    from bench.common import local_stack
    from common.config import load_config
    small = dict(num_kv_blocks=256, max_model_len=512, max_num_seqs=8, drain_grace_s=2.0, model=args.model,
                 router_port=0, nats_port=0, kv_manager_port=0, worker_base_port=0)
    with ExitStack() as stacks:
        b = stacks.enter_context(local_stack(load_config(None, workers=1, triton_port=0, **small)))
        b_triton = f"{b.cfg.host}:{b.cfg.triton_port}"
        a = stacks.enter_context(local_stack(load_config(None, workers=1, backend="triton", backend_url=b_triton,
                                                         backend_model=args.model, **small)))
        paths = {"native": lambda: native(b.router_address, args.model, args.max_tokens),
                 "triton_front": lambda: triton(b_triton, args.model, args.max_tokens),
                 "triton_hop": lambda: native(a.router_address, args.model, args.max_tokens)}
        ttft = {k: [] for k in paths}
        itl = {k: [] for k in paths}

        async def run():
            for name, fn in paths.items():   # warm-up
                await fn()
            for _ in range(args.requests):
                for name, fn in paths.items():
                    t0, times = await fn()
                    ttft[name].append(times[0] - t0)
                    itl[name].extend(np.diff(times).tolist())
        asyncio.run(run())
    res = {k: {"ttft_p50_ms": pct_ms(ttft[k], 50), "ttft_p99_ms": pct_ms(ttft[k], 99), "itl_p50_ms": pct_ms(itl[k], 50),
               "n": len(ttft[k])} for k in ttft}
    print(f"{'path':14} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8}   added vs native (TTFT p50 / p99 / ITL p50)")
    for k, r in res.items():
        d = [r[m] - res["native"][m] for m in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms")]
        print(f"{k:14} {r['ttft_p50_ms']:8.1f}ms {r['ttft_p99_ms']:8.1f}ms {r['itl_p50_ms']:7.1f}ms   "
              + ("-" if k == "native" else f"{d[0]:+.1f} / {d[1]:+.1f} / {d[2]:+.1f} ms"))
    print(f"({args.requests} requests per path, interleaved, max_tokens={args.max_tokens}, greedy, one at a time)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
