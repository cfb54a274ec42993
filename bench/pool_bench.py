"""`switchyard bench pool`: the model pool's numbers (issue: "A pool of many models").

1. cold load of SmolLM2 from the safetensors cache (load_model in this process, GGUF already
   converted), and the time until a newly loaded model serves its first token (a request for an
   unloaded pool model: load on demand + first token);
2. hot-swap v1 -> v2 under continuous traffic: failed requests (must be 0) and p50/p99 TTFT
   before vs during the swap;
3. a 10x spike on a model with one replica: time from spike start to the scaler's new replica
   serving its first request.

Writes JSON (default benchmarks/results/pool.json) and prints a summary. CPU by default; `--device cuda`
on a GPU host.
"""
from __future__ import annotations

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")   # before grpc: the pool forks replicas

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.metrics import percentile as pct  # None for no data: the JSON keeps null

CATALOG = """
[stack]
admin_tokens = ["bench-admin"]
num_kv_blocks = {kv_blocks}
max_model_len = 1024
max_num_seqs = 32
drain_grace_s = 30.0
device = "{device}"

[pool]
slots = 3
slot_memory_gb = 2.0
default_model = "chat"
load_timeout_s = 300

[pool.scaler]
target_per_replica = 4
scale_up_window_s = 1.0
scale_down_window_s = 30.0
idle_to_zero_s = 600
interval_s = 0.25

[[models]]
name = "chat"
source = "{source}"
capabilities = ["chat"]
max_context = 1024
min_replicas = 1
max_replicas = 1
memory_gb = 0.6
[models.versions]
v2 = "{source}"

[[models]]
name = "chat-cold"
source = "{source}"
capabilities = ["chat"]
max_context = 1024
min_replicas = 0
max_replicas = 1
memory_gb = 0.6

[[models]]
name = "spiky"
source = "{spike_source}"
capabilities = ["code"]
max_context = 1024
min_replicas = 1
max_replicas = 2
memory_gb = 0.2
"""


class Load:
    """`n` closed-loop clients; records (start, ttft, worker, error) per request."""

    def __init__(self, stub, model: str, n: int, max_tokens: int):
        self.stub, self.model, self.n, self.max_tokens = stub, model, n, max_tokens
        self.records: list[tuple[float, float | None, str, str]] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def _one(self, i: int, k: int) -> None:
        import grpc

        from protos.switchyard.v1 import common_pb2, inference_pb2
        req = inference_pb2.GenerateRequest(model=self.model, prompt=f"Client {i} request {k}: tell me about trains.",
                                            sampling=common_pb2.SamplingParams(max_tokens=self.max_tokens))
        t0 = time.monotonic()
        ttft, worker = None, ""
        try:
            async for r in self.stub.Generate(req, timeout=300):
                if ttft is None:
                    ttft, worker = time.monotonic() - t0, r.worker_id
            self.records.append((t0, ttft, worker, ""))
        except grpc.aio.AioRpcError as e:
            self.records.append((t0, ttft, worker, f"{e.code().name}: {e.details()}"))

    def resize(self, n: int) -> None:
        async def client(i):
            k = 0
            while not self._stop.is_set():
                k += 1
                await self._one(i, k)
        while len(self._tasks) < n:
            self._tasks.append(asyncio.create_task(client(len(self._tasks))))

    def start(self) -> Load:
        self.resize(self.n)
        return self

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def ttfts(self, t_from: float, t_to: float) -> list[float]:
        return [r[1] for r in self.records if t_from <= r[0] < t_to and r[1] is not None and not r[3]]

    @property
    def failures(self) -> list[str]:
        return [r[3] for r in self.records if r[3]]


async def _models(stub) -> dict:
    from protos.switchyard.v1 import inference_pb2
    return {m.name: m for m in (await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=10)).models}


async def run(router: str, args) -> dict:
    import grpc

    from common.rpc import options
    from protos.switchyard.v1 import common_pb2, inference_pb2, inference_pb2_grpc
    out: dict = {}
    async with grpc.aio.insecure_channel(router, options=options()) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        admin = inference_pb2_grpc.AdminStub(ch)
        md = (("authorization", "Bearer bench-admin"),)

        # -- 1. newly loaded model: request for an unloaded model -> load on demand -> first token
        t0 = time.monotonic()
        first = None
        async for r in stub.Generate(inference_pb2.GenerateRequest(
                model="chat-cold", prompt="Hello!", sampling=common_pb2.SamplingParams(max_tokens=4)), timeout=600):
            first = first or time.monotonic() - t0
        out["on_demand_load_first_token_s"] = first
        print(f"  on-demand load of chat-cold + first token: {first:.2f}s", flush=True)
        # and explicitly: unload, LoadModel(wait), then a first request
        await admin.UnloadModel(inference_pb2.UnloadModelRequest(name="chat-cold", wait=True), metadata=md, timeout=120)
        t0 = time.monotonic()
        await admin.LoadModel(inference_pb2.LoadModelRequest(name="chat-cold", wait=True), metadata=md, timeout=600)
        t_loaded = time.monotonic() - t0
        t1 = time.monotonic()
        ttft = None
        async for r in stub.Generate(inference_pb2.GenerateRequest(
                model="chat-cold", prompt="Hello!", sampling=common_pb2.SamplingParams(max_tokens=4)), timeout=600):
            ttft = ttft or time.monotonic() - t1
        out["admin_load_s"], out["admin_load_then_ttft_s"] = t_loaded, ttft
        print(f"  LoadModel(wait) {t_loaded:.2f}s, then first token in {ttft * 1000:.0f} ms", flush=True)
        await admin.UnloadModel(inference_pb2.UnloadModelRequest(name="chat-cold", wait=True), metadata=md, timeout=120)

        # -- 2. hot-swap under traffic
        load = Load(stub, "chat", args.swap_clients, args.max_tokens).start()
        t_before = time.monotonic()
        await asyncio.sleep(args.before_s)
        t_swap0 = time.monotonic()
        resp = await admin.LoadModel(inference_pb2.LoadModelRequest(name="chat", version="v2", wait=True),
                                     metadata=md, timeout=600)
        t_swap1 = time.monotonic()
        await asyncio.sleep(2.0)
        await load.stop()
        before, during = load.ttfts(t_before + 1.0, t_swap0), load.ttfts(t_swap0, t_swap1)
        out["hot_swap"] = {
            "message": resp.message, "swap_s": t_swap1 - t_swap0, "requests": len(load.records),
            "failed": len(load.failures), "failures": load.failures[:5],
            "ttft_before_ms": {"n": len(before), "p50": _ms(pct(before, 50)), "p99": _ms(pct(before, 99))},
            "ttft_during_ms": {"n": len(during), "p50": _ms(pct(during, 50)), "p99": _ms(pct(during, 99))},
        }
        hs = out["hot_swap"]
        print(f"  hot-swap {hs['swap_s']:.1f}s, {hs['requests']} requests, {hs['failed']} failed; TTFT p50/p99 "
              f"before {hs['ttft_before_ms']['p50']}/{hs['ttft_before_ms']['p99']} ms, during "
              f"{hs['ttft_during_ms']['p50']}/{hs['ttft_during_ms']['p99']} ms", flush=True)

        # -- 3. 10x spike on `spiky` (1 replica, max 2)
        initial = set((await _models(stub))["spiky"].workers)
        load = Load(stub, "spiky", args.spike_base, args.spike_max_tokens).start()
        await asyncio.sleep(args.before_s)
        t_spike = time.monotonic()
        load.resize(args.spike_base * 10)
        t_desired = t_ready = t_served = None
        deadline = t_spike + args.spike_timeout_s
        while time.monotonic() < deadline and t_served is None:
            m = (await _models(stub))["spiky"]
            now = time.monotonic()
            if t_desired is None and m.desired_replicas > len(initial):
                t_desired = now - t_spike
            if t_ready is None and m.replicas > len(initial):
                t_ready = now - t_spike
            new = [r for r in load.records if r[2] and r[2] not in initial and r[0] >= t_spike]
            if new:
                t_served = min(r[0] + (r[1] or 0) for r in new) - t_spike
            await asyncio.sleep(0.1)
        await load.stop()
        out["spike"] = {"base_clients": args.spike_base, "spike_clients": args.spike_base * 10,
                        "desired_raised_s": t_desired, "new_replica_ready_s": t_ready,
                        "new_replica_first_token_s": t_served, "failed": len(load.failures),
                        "requests": len(load.records)}
        sp = out["spike"]
        print(f"  10x spike: desired raised after {_s(sp['desired_raised_s'])}, new replica ready after "
              f"{_s(sp['new_replica_ready_s'])}, serving after {_s(sp['new_replica_first_token_s'])}; "
              f"{sp['failed']} failed of {sp['requests']}", flush=True)
    return out


def _ms(x):
    return None if x is None else round(x * 1000, 1)


def _s(x):
    return "n/a" if x is None else f"{x:.1f}s"


def cold_load(source: str, device: str) -> dict:
    import torch

    from workers.engine.loader import load_model
    load_model(source, device=device)          # converts the GGUF once (cached)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        lm = load_model(source, device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        del lm
    return {"source": source, "device": device, "load_s_median": statistics.median(times), "load_s": times}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="switchyard bench pool", description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="smollm2-135m", help="model for load/hot-swap (default SmolLM2-135M)")
    ap.add_argument("--spike-source", default="random:tiny", help="model for the 10x spike")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--swap-clients", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--before-s", type=float, default=8.0)
    ap.add_argument("--spike-base", type=int, default=1)
    ap.add_argument("--spike-max-tokens", type=int, default=64)
    ap.add_argument("--spike-timeout-s", type=float, default=240.0)
    ap.add_argument("--out", default="benchmarks/results/pool.json")
    args = ap.parse_args(argv)

    from bench.common import local_stack, machine_info, stack_config, write_json
    result: dict = {"machine": machine_info(args.device), "args": vars(args)}
    print("cold load from the safetensors cache ...", flush=True)
    result["cold_load"] = cold_load(args.source, args.device)
    print(f"  {args.source}: {result['cold_load']['load_s_median']:.2f}s (median of 3)", flush=True)
    with tempfile.TemporaryDirectory(prefix="sy-poolbench-") as td:
        cat = Path(td) / "pool.toml"
        cat.write_text(CATALOG.format(source=args.source, spike_source=args.spike_source, device=args.device,
                                      kv_blocks=1024 if args.device.startswith("cuda") else 256))
        cfg = stack_config(pool_config=str(cat))
        print("starting a pool stack ...", flush=True)
        t0 = time.monotonic()
        with local_stack(cfg) as stack:
            result["stack_start_s"] = time.monotonic() - t0
            result.update(asyncio.run(run(stack.router_address, args)))
    p = write_json(args.out, result)
    print(f"wrote {p}")
    ok = result.get("hot_swap", {}).get("failed", 1) == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
