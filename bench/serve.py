"""`switchyard bench serve`: load-test the router's gRPC API (or the in-process engine with --inproc).

Drives a seeded workload (synthetic lengths, shared-prefix, or the repo's chat prompt set) with a
load shape (Poisson, gamma bursts, fixed concurrency, a rate sweep, or a 10x spike) and reports
TTFT / TPOT / ITL / E2E percentiles, request and token throughput, goodput under an SLO, errors
by gRPC status, $ per 1K tokens from a GPU $/hour and the monthly volume above which
self-hosting beats API pricing. Latency as users feel it: ITL by output position (buckets over
--itl-slo-ms flagged), perceived tokens/s per request, and each request's E2E split into client +
network, router, NATS, queue, prefill, decode and the rest (router and NATS need --traces).
--json writes it all; --plot writes PNGs.

Without --router or --inproc it starts its own stack on free ports (and stops it after).
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time

from bench import loadgen, metrics, workloads
from bench.common import machine_info, save_outputs

SUMMARY_KEYS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")


def add_workload_args(ap: argparse.ArgumentParser, *, num_requests: int = 64, input_len: str = "32-128",
                      output_len: str = "16-64", workload: str = "synthetic") -> None:
    g = ap.add_argument_group("workload (all seeded)")
    g.add_argument("--workload", choices=["synthetic", "shared-prefix", "chat"], default=workload)
    g.add_argument("--num-requests", type=int, default=num_requests)
    g.add_argument("--input-len", default=input_len, help="synthetic prompt tokens: N or MIN-MAX (uniform)")
    g.add_argument("--output-len", default=output_len, help="output tokens: N or MIN-MAX (uniform; EOS ignored)")
    g.add_argument("--num-prefixes", type=int, default=4, help="shared-prefix: distinct system prompts")
    g.add_argument("--questions-per-prefix", type=int, default=6, help="shared-prefix: questions per prompt")
    g.add_argument("--prefix-len", type=int, default=256, help="shared-prefix: system prompt tokens")
    g.add_argument("--output-scale", type=float, default=1.0, help="chat: scale the answers' lengths")
    g.add_argument("--max-output", type=int, default=None, help="chat: cap the answers' lengths")
    g.add_argument("--seed", type=int, default=0)


def add_cost_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("SLO and cost")
    g.add_argument("--slo-ttft-ms", type=float, default=50.0)
    g.add_argument("--slo-tpot-ms", type=float, default=None)
    g.add_argument("--slo-e2e-ms", type=float, default=None)
    g.add_argument("--itl-slo-ms", type=float, default=None,
                   help="flag every output-position bucket whose ITL p99 is above this")
    g.add_argument("--gpu-usd-per-hour", type=float, default=None,
                   help="accelerator price for the cost figures (default: the stack config's gpu_usd_per_hour)")
    g.add_argument("--api-input-usd-per-m", type=float, default=metrics.DEFAULT_API_INPUT_USD_PER_M,
                   help="API price per 1M input tokens (default GPT-5: 1.25)")
    g.add_argument("--api-output-usd-per-m", type=float, default=metrics.DEFAULT_API_OUTPUT_USD_PER_M,
                   help="API price per 1M output tokens (default GPT-5: 10)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="switchyard bench serve", description=__doc__.splitlines()[0])
    t = ap.add_argument_group("target")
    t.add_argument("--router", default=None, help="an already running router (host:port)")
    t.add_argument("--inproc", action="store_true", help="drive the in-process engine instead of a stack")
    t.add_argument("--model", default="smollm2-135m", help="built-in name, e.g. smollm2-135m or random:llama-1b")
    t.add_argument("--device", default=None, help="cpu | cuda (in-process engine, or the stack this starts)")
    t.add_argument("--config", default=None, help="stack config (TOML/JSON) for the stack this starts")
    t.add_argument("--workers", type=int, default=1, help="workers of the stack this starts")
    t.add_argument("--routing-policy", default=None, help="kv | least_loaded | round_robin (stack this starts)")
    t.add_argument("--num-kv-blocks", type=int, default=None)
    t.add_argument("--max-model-len", type=int, default=2048)
    t.add_argument("--max-num-seqs", type=int, default=None)
    t.add_argument("--max-waiting", type=int, default=None, help="admission bound (queue beyond it is shed)")
    t.add_argument("--torch-threads", type=int, default=None, help="in-process: torch.set_num_threads")
    t.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget per step, also the prefill chunk size (stack this starts)")
    t.add_argument("--auto-tune", action="store_true",
                   help="the stack this starts measures its threads, token budget and admission window as "
                        "`switchyard up` does (workers/tuning.py); the choice goes into the JSON")
    t.add_argument("--traces", action="store_true",
                   help="trace the stack this starts (a trace file) and split router and NATS out of E2E")
    t.add_argument("--trace-file", default=None,
                   help="with --router: the trace file that stack writes (switchyard up --trace-file), "
                        "read to split router and NATS out of E2E")
    lg = ap.add_argument_group("load shape")
    lg.add_argument("--load", choices=["poisson", "gamma", "concurrency", "sweep", "spike"], default="poisson")
    lg.add_argument("--request-rate", type=float, default=4.0, help="requests/s (spike: the base rate)")
    lg.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 = Poisson, < 1 burstier")
    lg.add_argument("--concurrency", type=int, default=8)
    lg.add_argument("--sweep-rates", default="1,2,4,8", help="comma-separated request rates for --load sweep")
    lg.add_argument("--spike-factor", type=float, default=10.0)
    lg.add_argument("--spike-before-s", type=float, default=5.0)
    lg.add_argument("--spike-s", type=float, default=5.0)
    lg.add_argument("--spike-after-s", type=float, default=10.0)
    add_workload_args(ap)
    add_cost_args(ap)
    o = ap.add_argument_group("output")
    o.add_argument("--json", dest="json_path", default=None)
    o.add_argument("--plot", dest="plot_dir", default=None, help="write PNG plots here")
    o.add_argument("--no-progress", action="store_true")
    o.add_argument("--timeout-s", type=float, default=600.0, help="per request")
    return ap


def shapes_of(args) -> list[loadgen.LoadShape]:
    if args.load == "sweep":
        return [loadgen.LoadShape("poisson", rate=float(r)) for r in args.sweep_rates.split(",") if r.strip()]
    return [loadgen.LoadShape(args.load, rate=args.request_rate, burstiness=args.burstiness,
                              concurrency=args.concurrency, spike_factor=args.spike_factor,
                              spike_before_s=args.spike_before_s, spike_s=args.spike_s,
                              spike_after_s=args.spike_after_s)]


def specs_for(args, tokenizer, n: int) -> list[workloads.RequestSpec]:
    return workloads.build(args.workload, tokenizer, n, input_len=args.input_len, output_len=args.output_len,
                           num_prefixes=args.num_prefixes, questions_per_prefix=args.questions_per_prefix,
                           prefix_len=args.prefix_len, output_scale=args.output_scale, max_output=args.max_output,
                           seed=args.seed)


def plan(args, tokenizer, shape: loadgen.LoadShape) -> tuple[list, list[float] | None]:
    """(specs, arrival offsets) for one run: the spike's length sets its request count; the
    shared-prefix workload's N x M sets the count otherwise."""
    n = args.num_requests
    if args.workload == "shared-prefix" and shape.kind != "spike":
        n = args.num_prefixes * args.questions_per_prefix
    times = loadgen.arrival_times(shape, n, args.seed)
    specs = specs_for(args, tokenizer, len(times) if times is not None else n)
    return specs, times


def collect_traces(path: str, request_ids: list[str], timeout_s: float = 10.0) -> dict[str, dict]:
    """request id -> its telemetry/breakdown.py row, from a trace file the stack writes; waits (up to
    timeout_s) for the exporters' batches to land (they flush about once a second)."""
    from telemetry.breakdown import load_spans, request_breakdowns
    want = {r for r in request_ids if r}
    deadline = time.monotonic() + timeout_s
    found: dict[str, dict] = {}
    while True:
        try:
            found = {row["request_id"]: row for row in request_breakdowns(load_spans(path))
                     if row["request_id"] in want}
        except (OSError, ValueError):
            found = {}
        if len(found) == len(want) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def report_of(result: loadgen.RunResult, args, gpu_usd_per_hour: float, label: str = "") -> dict:
    ok = [r for r in result.records if r.ok]
    traces = None
    trace_file = getattr(args, "trace_file", None)
    if trace_file:
        traces = collect_traces(trace_file, [r.request_id for r in ok])
    rep = metrics.run_report(result.records, slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms,
                             slo_e2e_ms=args.slo_e2e_ms, gpu_usd_per_hour=gpu_usd_per_hour,
                             api_input_usd_per_m=args.api_input_usd_per_m,
                             api_output_usd_per_m=args.api_output_usd_per_m,
                             itl_slo_ms=getattr(args, "itl_slo_ms", None), traces=traces)
    rep["label"] = label
    rep["samples_ms"] = {"ttft": [r.ttft * 1000 for r in ok if r.ttft is not None],
                         "tpot": [r.tpot * 1000 for r in ok if r.tpot is not None],
                         "itl": [x * 1000 for r in ok for x in r.itls],
                         "e2e": [r.e2e * 1000 for r in ok if r.e2e is not None]}
    rep["timeline"] = loadgen.timeline(result.records, result.t0, 1.0, result.queue)
    by_worker: dict[str, int] = {}
    for r in ok:
        by_worker[r.worker_id or "inproc"] = by_worker.get(r.worker_id or "inproc", 0) + 1
    rep["requests_by_worker"] = by_worker
    return rep


async def run_shapes(target, args, tokenizer, shapes, gpu_usd_per_hour: float, label: str = "") -> list[dict]:
    runs = []
    for shape in shapes:
        specs, times = plan(args, tokenizer, shape)
        desc = shape.describe()
        what = desc.get("rate", desc.get("concurrency", ""))
        prog = loadgen.Progress(len(times) if times is not None else len(specs),
                                f"{label or target.name} {desc['kind']} {what}",
                                enabled=None if not args.no_progress else False)
        result = await loadgen.drive(target, specs, times, shape.concurrency, prog)
        rep = report_of(result, args, gpu_usd_per_hour, label or target.name)
        rep["load"] = desc
        rep["offered_request_per_s"] = (len(times) / max(times[-1], 1e-9)) if times and len(times) > 1 else None
        runs.append(rep)
    return runs


def assemble(runs: list[dict], args, extra: dict | None = None) -> dict:
    """The JSON: the last (for a sweep: highest-rate) run's figures at the top level, every run in `runs`."""
    top = dict(runs[-1])
    out = {"benchmark": "serve", "machine": machine_info(getattr(args, "device", None)), "model": args.model,
           "workload": {k: getattr(args, k) for k in ("workload", "num_requests", "input_len", "output_len",
                                                      "num_prefixes", "questions_per_prefix", "prefix_len",
                                                      "output_scale", "max_output", "seed")},
           **top, **(extra or {})}
    if len(runs) > 1:
        out["runs"] = runs
    return out


def print_summary(rep: dict, out=sys.stdout) -> None:
    label = rep.get("label") or ""
    load = rep.get("load", {})
    print(f"== {label} {load} : {rep['completed']}/{rep['num_requests']} ok in {rep['duration_s']:.1f}s", file=out)
    print(f"   {'':6} {'p50':>9} {'p90':>9} {'p95':>9} {'p99':>9} {'mean':>9}  (ms)", file=out)
    for k in SUMMARY_KEYS:
        s = rep[k]
        cells = " ".join(f"{s[q]:>9.1f}" if s[q] is not None else f"{'-':>9}"
                         for q in ("p50", "p90", "p95", "p99", "mean"))
        print(f"   {k[:-3]:6} {cells}", file=out)
    be = rep.get("break_even_tokens_per_month")
    cost = rep.get("cost_usd_per_1k_output_tokens")
    print(f"   {rep['request_per_s']:.2f} req/s, {rep['output_tok_s']:.1f} output tok/s, "
          f"goodput {rep['goodput_req_s']:.2f} req/s "
          f"(SLO ttft<={rep['slo']['ttft_ms']} tpot<={rep['slo']['tpot_ms']}), "
          f"errors {rep['errors'] or 'none'}", file=out)
    print(f"   ${cost:.4f}/1K output tokens at ${rep['gpu_usd_per_hour']}/h; "
          if cost is not None else "   cost: n/a; ", end="", file=out)
    print("break-even vs API: " + (f"{be:,.0f} tokens/month" if be is not None else
                                   "never (one accelerator at this throughput costs more per token than the API)"),
          file=out)
    print_user_latency(rep, out)


def _ms(v) -> str:
    return f"{v:>9.1f}" if v is not None else f"{'-':>9}"


def print_user_latency(rep: dict, out=sys.stdout) -> None:
    """ITL by output position, perceived tok/s and the E2E split (latency as users feel it)."""
    pos = rep.get("itl_by_position_ms")
    if pos:
        slo = pos.get("itl_slo_ms")
        print(f"   ITL by output position (ms){f'; SLO p99 <= {slo:g} ms' if slo is not None else ''}:", file=out)
        print(f"   {'position':9} {'n':>6} {'p50':>9} {'p90':>9} {'p99':>9}", file=out)
        t = pos["ttft"]
        print(f"   {'1 (TTFT)':9} {t['count']:>6} {_ms(t['p50'])} {_ms(t['p90'])} {_ms(t['p99'])}", file=out)
        for b, st in pos["buckets"].items():
            if not st["count"]:
                continue
            flag = "  > SLO" if b in pos["over_slo"] else ""
            print(f"   {b:9} {st['count']:>6} {_ms(st['p50'])} {_ms(st['p90'])} {_ms(st['p99'])}{flag}", file=out)
        if pos["over_slo"]:
            print(f"   ITL p99 over {slo:g} ms at positions {', '.join(pos['over_slo'])}", file=out)
    per = rep.get("perceived_tok_s")
    if per and per.get("count"):
        print(f"   perceived tok/s per request (after the first token): p50 {per['p50']:.1f}, "
              f"p10 (slow tail) {per['p10']:.1f}; total output {rep['output_tok_s']:.1f} tok/s", file=out)
    sp = rep.get("e2e_split_ms")
    if sp and sp.get("requests"):
        cells = []
        for p in metrics.SPLIT_PARTS:
            d = sp[p]
            if d["p50"] is not None:
                share = f" {100 * d['share_e2e']:.0f}%" if d["share_e2e"] is not None else ""
                cells.append(f"{p} {d['p50']:.1f}{share}")
        print(f"   E2E split, p50 ms and share of E2E ({sp['traced']}/{sp['requests']} traced): "
              + ", ".join(cells), file=out)
        ir = sp["inference_ratio"]
        if ir["p50"] is not None:
            print(f"   inference (prefill+decode) / E2E: p50 {ir['p50']:.2f}, p10 {ir['p10']:.2f}, "
                  f"run {ir['run']:.2f}", file=out)
        if sp.get("verdict"):
            print(f"   {sp['verdict']}", file=out)


def make_target(args, stack_router: str | None = None):
    """(target, tokenizer, gpu $/h) for the options given."""
    from common.config import load_config
    cfg = load_config(args.config) if args.config else load_config(None)
    price = args.gpu_usd_per_hour if args.gpu_usd_per_hour is not None else cfg.gpu_usd_per_hour
    if args.inproc:
        import torch

        from batcher.engine import Engine
        from bench.targets import EngineTarget
        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        over = dict(device=args.device, num_kv_blocks=args.num_kv_blocks, max_model_len=args.max_model_len,
                    max_num_seqs=args.max_num_seqs, max_waiting=args.max_waiting)
        over = {k: v for k, v in over.items() if v is not None}
        eng = Engine.from_model(args.model, **over)
        eng.warmup()
        return EngineTarget(eng), eng.tokenizer, price
    from bench.targets import StackTarget
    from common.tokenizers import load_tokenizer
    return StackTarget(stack_router or args.router, args.model, args.timeout_s), load_tokenizer(args.model), price


def stack_overrides(args) -> dict:
    o = dict(workers=args.workers, device=args.device, num_kv_blocks=args.num_kv_blocks,
             max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs, max_waiting=args.max_waiting,
             routing_policy=args.routing_policy, auto_tune=True if args.auto_tune else None,
             engine={"max_num_batched_tokens": args.max_num_batched_tokens} if args.max_num_batched_tokens else None)
    return {k: v for k, v in o.items() if v is not None}


async def _amain(args, router: str | None) -> dict:
    target, tok, price = make_target(args, router)
    try:
        await warm(target, tok)
        runs = await run_shapes(target, args, tok, shapes_of(args), price)
        extra = {"target": "inproc" if args.inproc else "stack", "router": router}
        if hasattr(target, "worker_stats"):
            try:
                extra["worker_stats"] = await target.worker_stats()
            except Exception:
                pass
        return assemble(runs, args, extra)
    finally:
        c = target.close()
        if asyncio.iscoroutine(c):
            await c


async def warm(target, tokenizer) -> None:
    """One tiny request first: connections, first-step costs and lazy imports stay out of the figures."""
    rec = metrics.RequestRecord(-1, 0.0)
    await target.generate(workloads.RequestSpec(prompt="Warm up.", max_tokens=2), rec)


def run(args) -> dict:
    if args.router or args.inproc:
        if args.inproc:
            args.trace_file = None
        return asyncio.run(_amain(args, args.router))
    import shutil
    import tempfile

    from bench.common import local_stack, stack_config
    over = stack_overrides(args)
    trace_dir = tempfile.mkdtemp(prefix="switchyard-bench-traces-") if args.traces else None
    args.trace_file = f"{trace_dir}/trace.jsonl" if trace_dir else None
    if trace_dir:
        over["trace_file"] = args.trace_file
    cfg = stack_config(args.model, args.config, **over)
    try:
        with local_stack(cfg) as stack:
            rep = asyncio.run(_amain(args, stack.router_address))
            tuning = stack.machine.state()   # defaults chosen from the machine (--auto-tune), and why
    finally:
        if trace_dir:
            shutil.rmtree(trace_dir, ignore_errors=True)
    flat = {**cfg.to_dict(), **cfg.to_dict()["engine"]}   # engine keys side by side with the stack's
    rep["stack_config"] = {k: v for k, v in flat.items()
                           if k in ("workers", "num_kv_blocks", "max_model_len", "max_num_seqs", "max_waiting",
                                    "max_num_batched_tokens", "routing_policy", "device", "enable_prefix_caching")}
    if tuning is not None:
        rep["tuning"] = tuning
        rep["stack_config"].update({k: tuning[k] for k in ("num_threads", "max_num_batched_tokens",
                                                           "admission_window_ms") if tuning[k] is not None})
    return rep


def _serve_plots(rep: dict, out_dir: str) -> list:
    from bench import plots  # matplotlib only when plots are asked for
    return plots.serve_plots(rep, out_dir)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.traces and (args.router or args.inproc):
        ap.error("--traces traces the stack this command starts; with --router give that stack's --trace-file")
    if args.trace_file and not args.router:
        ap.error("--trace-file reads an already running stack's traces: use it with --router")
    rep = run(args)
    for r in rep.get("runs", [rep]):
        print_summary(r)
    save_outputs(rep, args.json_path, args.plot_dir, _serve_plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
