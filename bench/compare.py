"""`switchyard bench compare`: side by side in one run, on the same seeded workload and arrivals.

--batching  static batching (admit up to B, step until all B finish, then the next B; same engine)
            vs continuous batching (the normal engine, at most B running) under the same Poisson
            arrivals: continuous_over_static_throughput and TTFT p99 of each.
--engine    our engine (continuous batching) vs HF transformers `generate` (static batches of B)
            serving the same arrivals: ours_over_hf_throughput.
--routing   round_robin vs least_loaded vs kv over a real 2-worker stack (one fresh stack per
            policy) on the shared-prefix workload: prefix-cache hit rate, TTFT p50/p99.
With none of the three flags, all three run.
--speculative  the speculative-decoding trade-off study instead (bench/spec_bench.py, its own flags:
            `switchyard bench compare --speculative --help`): continuous batching alone, + prefix
            caching, + each speculation method, + both, on copy-heavy / shared-prefix / chat workloads
            at low load and saturation.
"""
from __future__ import annotations

import argparse
import asyncio
import sys

from bench import loadgen, serve
from bench.common import machine_info, save_outputs


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="switchyard bench compare", description=__doc__.splitlines()[0])
    ap.add_argument("--batching", action="store_true")
    ap.add_argument("--engine", action="store_true")
    ap.add_argument("--routing", action="store_true")
    ap.add_argument("--speculative", action="store_true",
                    help="the speculative-decoding study (bench/spec_bench.py; its flags follow, e.g. --quick)")
    ap.add_argument("--model", default="smollm2-135m", help="built-in name, e.g. smollm2-135m or random:llama-1b")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--request-rate", type=float, default=2.0, help="Poisson arrivals, requests/s")
    ap.add_argument("--batch-size", type=int, default=8,
                    help="static batch size B; also continuous batching's max running requests")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--num-kv-blocks", type=int, default=512)
    ap.add_argument("--torch-threads", type=int, default=None, help="in-process runs: torch.set_num_threads")
    ap.add_argument("--routing-workers", type=int, default=2)
    ap.add_argument("--routing-rate", type=float, default=None,
                    help="routing runs' request rate (default --request-rate)")
    ap.add_argument("--policies", default="round_robin,least_loaded,kv")
    serve.add_workload_args(ap, num_requests=32, input_len="32-128", output_len="8-64")
    serve.add_cost_args(ap)
    ap.add_argument("--json", dest="json_path", default=None)
    ap.add_argument("--plot", dest="plot_dir", default=None)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--timeout-s", type=float, default=600.0)
    return ap


def _price(args) -> float:
    if args.gpu_usd_per_hour is not None:
        return args.gpu_usd_per_hour
    from common.config import load_config
    return load_config(None).gpu_usd_per_hour


async def _one(target, args, tok, shape, label: str) -> dict:
    args_w = argparse.Namespace(**vars(args))
    return (await serve.run_shapes(target, args_w, tok, [shape], _price(args), label))[0]


def _engine(args):
    import torch

    from batcher.engine import Engine
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    # No prefix caching: every variant re-runs the same prompts, and must not find them cached.
    eng = Engine.from_model(args.model, device=args.device, num_kv_blocks=args.num_kv_blocks,
                            max_model_len=args.max_model_len,
                            max_num_seqs=args.batch_size, enable_prefix_caching=False)
    eng.warmup()
    return eng


def _synthetic_args(args) -> argparse.Namespace:
    a = argparse.Namespace(**vars(args))
    if a.workload == "shared-prefix":
        a.workload = "synthetic"
    return a


async def batching(args, eng) -> dict:
    from bench.targets import EngineTarget
    a = _synthetic_args(args)
    shape = loadgen.LoadShape("poisson", rate=args.request_rate)
    out = {}
    for label, static in (("static", args.batch_size), ("continuous", None)):
        t = EngineTarget(eng, static_batch=static)
        try:
            await serve.warm(t, eng.tokenizer)
            out[label] = await _one(t, a, eng.tokenizer, shape, label if static is None else f"static (B={static})")
        finally:
            t.close()
    s, c = out["static"], out["continuous"]
    return {"batch_size": args.batch_size, "load": shape.describe(), "static": s, "continuous": c,
            "continuous_over_static_throughput": c["output_tok_s"] / s["output_tok_s"] if s["output_tok_s"] else None,
            "ttft_p99_ms": {"static": s["ttft_ms"]["p99"], "continuous": c["ttft_ms"]["p99"]}}


async def engine_vs_hf(args, eng, ours: dict | None) -> dict:
    from bench.common import load_hf_model
    from bench.targets import EngineTarget, HFTarget
    a = _synthetic_args(args)
    shape = loadgen.LoadShape("poisson", rate=args.request_rate)
    if ours is None:
        t = EngineTarget(eng)
        try:
            await serve.warm(t, eng.tokenizer)
            ours = await _one(t, a, eng.tokenizer, shape, "ours (continuous)")
        finally:
            t.close()
    else:
        ours = dict(ours, label="ours (continuous)")
    hf = load_hf_model(eng.loaded, eng.config.device)
    pad = (eng.tokenizer.eos_token_ids or [0])[0]
    t = HFTarget(hf, eng.encode_prompt, pad, args.batch_size, eng.config.device)
    try:
        await serve.warm(t, eng.tokenizer)
        theirs = await _one(t, a, eng.tokenizer, shape, f"HF generate (B={args.batch_size})")
    finally:
        t.close()
    return {"load": shape.describe(), "ours": ours, "hf": theirs,
            "ours_over_hf_throughput": (ours["output_tok_s"] / theirs["output_tok_s"]
                                        if theirs["output_tok_s"] else None),
            "ttft_p99_ms": {"ours": ours["ttft_ms"]["p99"], "hf": theirs["ttft_ms"]["p99"]}}


def routing(args) -> dict:
    from bench.common import local_stack, stack_config
    from bench.targets import StackTarget
    from common.tokenizers import load_tokenizer
    a = argparse.Namespace(**vars(args))
    a.workload = "shared-prefix"
    shape = loadgen.LoadShape("poisson", rate=args.routing_rate or args.request_rate)
    tok = load_tokenizer(args.model)
    out: dict = {"workers": args.routing_workers, "load": shape.describe(), "policies": {}}
    for policy in [p.strip() for p in args.policies.split(",") if p.strip()]:
        cfg = stack_config(args.model, None, workers=args.routing_workers, routing_policy=policy, device=args.device,
                           num_kv_blocks=args.num_kv_blocks, max_model_len=args.max_model_len)

        async def go(router: str) -> dict:
            t = StackTarget(router, args.model, args.timeout_s)
            try:
                await serve.warm(t, tok)
                rep = await _one(t, a, tok, shape, policy)
                try:
                    rep["worker_stats"] = await t.worker_stats()
                except Exception:
                    pass
                return rep
            finally:
                await t.close()
        with local_stack(cfg) as stack:
            out["policies"][policy] = asyncio.run(go(stack.router_address))
    pol = out["policies"]
    out["summary"] = {p: {"prefix_cache_hit_rate": r["prefix_cache_hit_rate"], "ttft_p50_ms": r["ttft_ms"]["p50"],
                          "ttft_p99_ms": r["ttft_ms"]["p99"], "requests_by_worker": r["requests_by_worker"]}
                      for p, r in pol.items()}
    if "kv" in pol and "round_robin" in pol:
        k, rr = pol["kv"], pol["round_robin"]
        out["kv_minus_round_robin_hit_rate"] = ((k["prefix_cache_hit_rate"] or 0) - (rr["prefix_cache_hit_rate"] or 0))
        out["kv_over_round_robin_ttft_p99"] = (k["ttft_ms"]["p99"] / rr["ttft_ms"]["p99"]
                                               if k["ttft_ms"]["p99"] and rr["ttft_ms"]["p99"] else None)
    return out


def run(args) -> dict:
    if not (args.batching or args.engine or args.routing):
        args.batching = args.engine = args.routing = True
    rep: dict = {"benchmark": "compare", "machine": machine_info(), "model": args.model,
                 "workload": {k: getattr(args, k) for k in (
                     "workload", "num_requests", "input_len", "output_len", "num_prefixes", "questions_per_prefix",
                     "prefix_len", "seed")}}
    if args.batching or args.engine:
        eng = _engine(args)
        if args.batching:
            b = rep["batching"] = asyncio.run(batching(args, eng))
            rep["continuous_over_static_throughput"] = b["continuous_over_static_throughput"]
            rep["static_ttft_p99_ms"] = b["ttft_p99_ms"]["static"]
            rep["continuous_ttft_p99_ms"] = b["ttft_p99_ms"]["continuous"]
        if args.engine:
            ours = rep["batching"]["continuous"] if args.batching else None
            e = rep["engine"] = asyncio.run(engine_vs_hf(args, eng, ours))
            rep["ours_over_hf_throughput"] = e["ours_over_hf_throughput"]
    if args.routing:
        rep["routing"] = routing(args)
    end = machine_info(args.device)
    rep["machine"].update(torch_threads=end["torch_threads"], loadavg_end=end["loadavg_1_5_15"])
    return rep


def print_report(rep: dict, out=sys.stdout) -> None:
    if "batching" in rep:
        b = rep["batching"]
        for k in ("static", "continuous"):
            serve.print_summary(b[k], out)
        print(f"** continuous / static throughput: {b['continuous_over_static_throughput']:.2f}x; "
              f"TTFT p99 static {b['ttft_p99_ms']['static']:.0f} ms, "
              f"continuous {b['ttft_p99_ms']['continuous']:.0f} ms",
              file=out)
    if "engine" in rep:
        e = rep["engine"]
        if "batching" not in rep:
            serve.print_summary(e["ours"], out)
        serve.print_summary(e["hf"], out)
        print(f"** ours / HF generate throughput: {e['ours_over_hf_throughput']:.2f}x; TTFT p99 ours "
              f"{e['ttft_p99_ms']['ours']:.0f} ms, HF {e['ttft_p99_ms']['hf']:.0f} ms", file=out)
    if "routing" in rep:
        for p, r in rep["routing"]["policies"].items():
            serve.print_summary(r, out)
        print(f"** routing over {rep['routing']['workers']} workers (shared-prefix):", file=out)
        for p, s in rep["routing"]["summary"].items():
            hr = s["prefix_cache_hit_rate"]
            print(f"   {p:13} hit rate {100 * (hr or 0):5.1f}%  TTFT p50 {s['ttft_p50_ms'] or 0:7.0f} ms  "
                  f"p99 {s['ttft_p99_ms'] or 0:7.0f} ms  by worker {s['requests_by_worker']}", file=out)


def plots(rep: dict, out_dir: str) -> list:
    from pathlib import Path

    from bench import plots as P
    out = Path(out_dir)
    paths = []
    if "batching" in rep:
        v = [rep["batching"]["static"], rep["batching"]["continuous"]]
        paths += [P.compare_bars("batching", v, out / "compare_batching.png"),
                  P.latency_cdfs(v, out / "compare_batching_cdf.png", "static vs continuous batching"),
                  P.itl_by_position(v, out / "compare_batching_itl_by_position.png")]
    if "engine" in rep:
        v = [rep["engine"]["ours"], rep["engine"]["hf"]]
        paths += [P.compare_bars("engine", v, out / "compare_engine.png"),
                  P.latency_cdfs(v, out / "compare_engine_cdf.png", "our engine vs HF generate"),
                  P.itl_by_position(v, out / "compare_engine_itl_by_position.png")]
    if "routing" in rep:
        v = list(rep["routing"]["policies"].values())
        paths += [P.compare_bars("routing", v, out / "compare_routing.png"),
                  P.latency_cdfs(v, out / "compare_routing_cdf.png", "routing policies, shared-prefix workload"),
                  P.itl_by_position(v, out / "compare_routing_itl_by_position.png")]
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--speculative" in argv:   # a study of its own, with its own flags
        from bench import spec_bench
        return spec_bench.main([a for a in argv if a != "--speculative"])
    args = build_parser().parse_args(argv)
    rep = run(args)
    print_report(rep)
    save_outputs(rep, args.json_path, args.plot_dir, plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
