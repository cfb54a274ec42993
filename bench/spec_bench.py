"""`switchyard bench compare --speculative`: speculative decoding vs prefix caching vs continuous batching.

The trade-off study of issue 21, in one run on in-process engines (batcher.engine.Engine, the real
model on this machine; the model is loaded once, each configuration gets an engine on it and each
cell a fresh scheduler on that engine, so no cell inherits another's prefix cache, suffix cache or
measured acceptance):

configurations (continuous batching in all of them)
    cb              prefix caching off, speculation off (the reference)
    cb+pc           prefix caching on
    cb+<method>     one speculation method at a fixed k (speculative_adaptive off): prompt_lookup,
                    suffix, self_draft (the target's first layers + its head)
    cb+adaptive     --adaptive-method (default ngram: prompt lookup, then the suffix cache) with the
                    scheduler choosing k or no speculation per request per step
    cb+pc+best      prefix caching + the best speculation configuration of this run (the highest
                    geometric mean over every cell of its output tokens/s relative to cb's), adaptive;
                    it runs after the others (it needs their figures)
workloads
    copy-heavy      code edits and RAG answers quoting their context (bench/workloads.py copy_heavy)
    shared-prefix   a few long system prompts, several questions each (prefix caching's case)
    chat            the repo's free-form chat prompts (bench/data/chat_prompts.jsonl)
loads
    low             a closed loop of --low-concurrency streams (default 1)
    saturation      a closed loop of --saturation-concurrency streams (default 8, max_num_seqs 8)
The same seeded request sequence goes to every configuration (closed loops: request i is always the
workload's i-th; every request ignores EOS, so every configuration does the same work). Cells run
in turn, every configuration within a cell one after the other, so a shared box's drifting load
hits the figures compared with each other about alike.

Per cell: ITL p50/p99, TTFT p99, TPOT p50, output tokens/s, KV blocks in use (mean and peak over
steps, and the peak of blocks held for the prefix cache), acceptance rate (accepted / proposed
drafts, from EngineCore.spec_totals), tokens per step (output tokens after the first / decode
steps over the cell's requests, from each finishing RequestOutput: 1.0 without speculation), and
whether each request's greedy tokens equal the reference (cb) cell's.

ITL, stated plainly because tokens of one step arrive together: the in-process target timestamps
each engine step as it returns, so a speculating request's accepted drafts and its bonus token arrive
as one chunk. `itl_ms` is per token, bench/metrics.py's definition (the one `bench serve` and vLLM
use): a chunk of n tokens arriving g after the previous chunk gives n values of g/n, so a request's
ITLs sum to its decode time. Per-token ITL makes a speculative step of n tokens look like n short
gaps; the client sees one gap of g and then n tokens at once. So `chunk_gap_ms` reports the other
side too: one value per chunk after the first, the gap before it (with one token per step the two
are equal). Speculation's cost shows in chunk_gap_ms (a verification step is longer than a plain
decode), its gain in itl_ms and TPOT; both are in the table and the JSON. The goal ratio (low-load
copy-heavy ITL p50, cb / prompt lookup) uses itl_ms, as the issue's ITL does; the chunk-gap ratio is
printed beside it.

The eval guard (bench/eval.py's set and rules): per configuration, a subset of the eval set (greedy,
one line each) on a fresh engine of that configuration, compared with the same subset on cb: changed
answers (token ids differ) and accuracy. "identical tokens" when none changed; "within tolerance" when
some changed (another batch shape reorders a sum; near-ties flip) but accuracy moved by at most
ACCURACY_TOLERANCE; else FAIL.

Goals printed (issue 21, this CPU box): low-load copy-heavy ITL p50 cb / cb+prompt_lookup >= 1.8;
saturation output tokens/s cb+adaptive / cb >= 0.95 on every workload.

--quick is a ~2-minute smoke run (fewer, shorter requests; a smaller eval subset).
"""
from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from dataclasses import asdict, dataclass, replace

from bench import loadgen, metrics, serve, workloads
from bench.common import machine_info, save_outputs

WORKLOADS = ("copy-heavy", "shared-prefix", "chat")
LOADS = ("low", "saturation")
SPEC_METHODS = ("prompt_lookup", "suffix", "self_draft")
GOAL_ITL_RATIO = 1.8           # low-load copy-heavy ITL p50, no speculation / prompt lookup
GOAL_THROUGHPUT_RATIO = 0.95   # saturation output tokens/s, adaptive speculation / speculation off


@dataclass
class Size:
    """How much each cell runs."""
    low_requests: int = 4           # per workload, at low load
    sat_requests: int = 16          # per workload, at saturation
    output_len: str = "64-96"       # copy-heavy and shared-prefix answers (tokens, EOS ignored)
    chat_max_output: int = 96       # chat answers are capped at this
    prefix_len: int = 192           # shared-prefix system prompts (tokens)
    num_prefixes: int = 2
    eval_subset: int = 16


QUICK = Size(low_requests=1, sat_requests=4, output_len="32-40", chat_max_output=32, prefix_len=96,
             eval_subset=4)


@dataclass
class Config:
    name: str
    prefix_caching: bool = False
    method: str = "off"
    adaptive: bool = True

    def engine_overrides(self) -> dict:
        return dict(enable_prefix_caching=self.prefix_caching, speculative_method=self.method,
                    speculative_adaptive=self.adaptive)


def base_configs(methods: list[str], adaptive_method: str) -> list[Config]:
    """Every configuration but cb+pc+best, which needs this run's figures to choose its method."""
    out = [Config("cb"), Config("cb+pc", prefix_caching=True)]
    out += [Config(f"cb+{m}", method=m, adaptive=False) for m in methods]
    if adaptive_method != "off":
        out.append(Config("cb+adaptive", method=adaptive_method, adaptive=True))
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="switchyard bench compare --speculative", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="a ~2-minute smoke run: fewer, shorter requests")
    ap.add_argument("--methods", default=",".join(SPEC_METHODS),
                    help="speculation methods run at a fixed k, one configuration each")
    ap.add_argument("--adaptive-method", default="ngram",
                    help="the method of the adaptive configuration (off: none)")
    ap.add_argument("--num-speculative-tokens", type=int, default=4, help="k")
    # SmolLM2's early layers are poor drafters without a trained exit head: 22 of 30 is the shallowest
    # depth whose greedy drafts match at all often (about 6% of k=4 drafts; 7 layers: under 1%).
    ap.add_argument("--draft-model", default=None,
                    help="draft_model: the draft (built-in name, HF folder or GGUF); add draft_model to --methods")
    ap.add_argument("--draft-random-weights", default=None,
                    help="draft_model with random weights of this shape (e.g. llama-1b beside --model random:llama-8b "
                         "on a GPU: the speed side only, acceptance of random drafts means nothing)")
    ap.add_argument("--self-draft-layers", type=int, default=22,
                    help="self_draft: the target's first N layers + its head (0: the engine's default, a quarter)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--loads", default=",".join(LOADS))
    ap.add_argument("--low-concurrency", type=int, default=1, help="streams in flight at low load (1-2)")
    ap.add_argument("--saturation-concurrency", type=int, default=8,
                    help="streams in flight at saturation (also max_num_seqs)")
    ap.add_argument("--low-requests", type=int, default=None, help="requests per low-load cell")
    ap.add_argument("--saturation-requests", type=int, default=None, help="requests per saturation cell")
    ap.add_argument("--output-len", default=None, help="copy-heavy / shared-prefix output tokens: N or MIN-MAX")
    ap.add_argument("--eval-subset", type=int, default=None, help="eval-guard items per configuration (0: none)")
    ap.add_argument("--num-kv-blocks", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--torch-threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_path", default=None)
    ap.add_argument("--plot", dest="plot_dir", default=None)
    ap.add_argument("--no-progress", action="store_true")
    return ap


def size_of(args) -> Size:
    s = replace(QUICK) if args.quick else Size()
    if args.low_requests is not None:
        s.low_requests = args.low_requests
    if args.saturation_requests is not None:
        s.sat_requests = args.saturation_requests
    if args.output_len is not None:
        s.output_len = args.output_len
    if args.eval_subset is not None:
        s.eval_subset = args.eval_subset
    return s


def specs_for(workload: str, tokenizer, n: int, size: Size, seed: int) -> list[workloads.RequestSpec]:
    """n requests of a workload, the same for every configuration."""
    if workload == "copy-heavy":
        return workloads.copy_heavy(n, size.output_len, seed)
    if workload == "shared-prefix":
        per = max(1, math.ceil(n / size.num_prefixes))
        return workloads.shared_prefix(tokenizer, size.num_prefixes, per, size.prefix_len, size.output_len, seed)[:n]
    if workload == "chat":
        return workloads.chat(n, max_output=size.chat_max_output, seed=seed)
    raise ValueError(f"unknown workload {workload!r}: {', '.join(WORKLOADS)}")


# ---- one cell --------------------------------------------------------------------------------------
class _Probe:
    """The engine as EngineTarget drives it, plus what the study reads after every step: each request's
    tokens and its finishing output's speculation counters, and the KV blocks in use."""

    def __init__(self, eng):
        self.eng = eng
        self.target = None
        self.tokens: dict[int, list[int]] = {}       # request index -> output token ids
        self.finals: dict[int, tuple[int, int, int, int]] = {}   # index -> proposed, accepted, steps, tokens
        self.kv_used_sum = self.kv_steps = self.kv_used_peak = self.kv_cached_peak = 0

    def __getattr__(self, name):
        return getattr(self.eng, name)

    def step(self):
        outs = self.eng.step()
        a = self.eng.allocator
        used = a.num_used_blocks
        self.kv_used_sum += used
        self.kv_steps += 1
        self.kv_used_peak = max(self.kv_used_peak, used)
        self.kv_cached_peak = max(self.kv_cached_peak, a.num_cached_blocks)
        live = self.target._live if self.target is not None else {}
        for o in outs:
            item = live.get(o.request_id)
            idx = -1 if item is None else item[1].index
            if idx < 0:               # the warm-up request (serve.warm's record is index -1)
                continue
            self.tokens.setdefault(idx, []).extend(o.new_token_ids)
            if o.finished:
                self.finals[idx] = (o.spec_proposed, o.spec_accepted, o.decode_steps, o.num_output_tokens)
        return outs


def fresh_core(eng) -> None:
    """A new scheduler, allocator and speculation policy on the engine's runner (its model and KV
    tensors stay): an empty prefix cache, suffix cache and measured acceptance, as a new engine would
    have, without allocating and zeroing another KV cache (seconds per cell on this box)."""
    from batcher.engine_core import build_engine_core
    eng.step()   # a plan with only the finished ids: the runner lets go of their rows
    leftover = getattr(eng.runner, "seqs", None)
    if leftover:
        raise RuntimeError(f"the runner still holds {len(leftover)} request(s) after the cell")
    eng.core = build_engine_core(eng.config, num_blocks=eng.runner.num_blocks, block_size=eng.runner.block_size,
                                 max_model_len=eng.runner.max_model_len, runner=eng.runner, tokenizer=eng.tokenizer,
                                 eos_token_ids=eng.loaded.tokenizer.eos_token_ids or eng.loaded.config.eos_token_ids,
                                 seed=eng.config.seed)
    eng.scheduler = eng.core.scheduler
    eng.allocator = eng.scheduler.allocator


def spec_totals(eng) -> dict[str, tuple[int, int, int, int]]:
    """method -> (proposed, accepted, verify rows, emitted) so far ({} before the engine speculates)."""
    get = getattr(eng.core, "spec_totals", None)
    if get is None:
        return {}
    return {m: (c.proposed, c.accepted, c.verify_rows, c.emitted) for m, c in get().items()}


def _diff(after: dict, before: dict) -> dict[str, list[int]]:
    out = {}
    for m, v in after.items():
        d = [a - b for a, b in zip(v, before.get(m, (0, 0, 0, 0)))]
        if any(d):
            out[m] = d
    return out


def chunk_gaps(chunks: list[tuple[float, int]]) -> list[float]:
    """The gap before each chunk after the first (seconds): what a client waits between arrivals."""
    ts = [t for t, n in chunks if n > 0]
    return [b - a for a, b in zip(ts, ts[1:])]


def _report_args() -> argparse.Namespace:
    return argparse.Namespace(slo_ttft_ms=None, slo_tpot_ms=None, slo_e2e_ms=None, itl_slo_ms=None, trace_file=None,
                              api_input_usd_per_m=metrics.DEFAULT_API_INPUT_USD_PER_M,
                              api_output_usd_per_m=metrics.DEFAULT_API_OUTPUT_USD_PER_M)


async def run_cell(eng, specs: list, concurrency: int, label: str, progress: bool) -> tuple[dict, dict]:
    """One closed-loop run of specs on eng; (the cell's figures, request index -> output tokens)."""
    from bench.targets import EngineTarget
    probe = _Probe(eng)
    target = EngineTarget(probe)
    probe.target = target
    try:
        await serve.warm(target, eng.tokenizer)
        before = spec_totals(eng)
        probe.kv_used_sum = probe.kv_steps = probe.kv_used_peak = probe.kv_cached_peak = 0
        prog = loadgen.Progress(len(specs), label, enabled=None if progress else False)
        result = await loadgen.drive(target, specs, None, concurrency, prog)
    finally:
        target.close()
    spec = _diff(spec_totals(eng), before)
    rep = serve.report_of(result, _report_args(), 0.0, label)
    ok = [r for r in result.records if r.ok]
    gaps = [g * 1000.0 for r in ok for g in chunk_gaps(r.chunks)]
    proposed = sum(v[0] for v in spec.values())
    accepted = sum(v[1] for v in spec.values())
    rows = sum(v[2] for v in spec.values())
    emitted = sum(v[3] for v in spec.values())
    # tokens per decode step: the first token of a request comes from its prefill, the rest from its
    # decode steps (RequestOutput.decode_steps counts the steps after the first token)
    steps = sum(f[2] for f in probe.finals.values())
    toks = sum(f[3] - 1 for f in probe.finals.values() if f[3] > 0)
    bpb = eng.runner.kv_bytes_per_block()
    cell = {
        "label": label, "completed": rep["completed"], "failed": rep["failed"], "duration_s": rep["duration_s"],
        "output_tokens": rep["output_tokens"], "output_tok_s": rep["output_tok_s"],
        "ttft_ms": rep["ttft_ms"], "tpot_ms": rep["tpot_ms"], "itl_ms": rep["itl_ms"],
        "chunk_gap_ms": metrics.summarize(gaps), "errors": rep["errors"],
        "prefix_cache_hit_rate": rep["prefix_cache_hit_rate"],
        "kv": {"blocks_used_mean": probe.kv_used_sum / probe.kv_steps if probe.kv_steps else 0.0,
               "blocks_used_peak": probe.kv_used_peak, "blocks_cached_peak": probe.kv_cached_peak,
               "num_blocks": eng.allocator.num_blocks, "block_size": eng.allocator.block_size,
               "mb_used_peak": probe.kv_used_peak * bpb / 2**20},
        "spec": {"by_method": spec, "proposed": proposed, "accepted": accepted, "verify_rows": rows,
                 "emitted": emitted,
                 "acceptance_rate": accepted / proposed if proposed else None,
                 "tokens_per_verify_row": emitted / rows if rows else None,
                 "decode_steps": steps,
                 "tokens_per_step": toks / steps if steps else None,
                 "requests_speculated": sum(1 for f in probe.finals.values() if f[0] > 0)},
    }
    return cell, probe.tokens


# ---- the eval guard ------------------------------------------------------------------------------------
def eval_answers(eng, subset: int) -> tuple[list[dict], list]:
    from bench import eval as ev
    items = ev.load_set(subset=subset)
    return items, ev.run_engine(eng, items)


def eval_guard(items: list[dict], answers: list, ref: list | None) -> dict:
    """This configuration's eval answers against the reference configuration's (bench/eval.py rules)."""
    from bench import eval as ev
    res = ev.evaluate(items, answers)
    out = {"n": res["n"], "accuracy": res["accuracy"]}
    if ref is None:
        out["verdict"] = "reference"
        return out
    ref_acc = ev.evaluate(items, ref)["accuracy"]
    changed = [it["id"] for it, a, b in zip(items, answers, ref) if a.token_ids != b.token_ids]
    delta = res["accuracy"] - ref_acc
    out.update(changed=len(changed), changed_ids=changed, accuracy_delta=delta,
               verdict="identical tokens" if not changed else
               "within tolerance" if abs(delta) <= ev.ACCURACY_TOLERANCE + 1e-9 else "FAIL: accuracy")
    return out


# ---- the study -----------------------------------------------------------------------------------------
def _geomean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def best_spec_config(rep: dict, names: list[str]) -> str | None:
    """The speculating configuration with the highest geometric mean, over every cell, of its output
    tokens/s relative to cb's (at low load that is its latency, at saturation its throughput)."""
    cells = rep["cells"]
    score = {}
    for n in names:
        score[n] = _geomean([_ratio(cells[n][w][ld]["output_tok_s"], cells["cb"][w][ld]["output_tok_s"])
                             for w in cells["cb"] for ld in cells["cb"][w]
                             if w in cells.get(n, {}) and ld in cells[n][w]])
    score = {k: v for k, v in score.items() if v is not None}
    return max(score, key=score.get) if score else None


def run(args) -> dict:
    import torch

    from batcher.engine import Engine
    from workers.engine.config import EngineConfig
    from workers.engine.loader import load_model
    from workers.engine.model_runner import resolve_dtype
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    size = size_of(args)
    wls = [w.strip() for w in args.workloads.split(",") if w.strip()]
    loads = [x.strip() for x in args.loads.split(",") if x.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    t_start = time.perf_counter()
    rep: dict = {"benchmark": "compare --speculative", "machine": machine_info(args.device), "model": args.model,
                 "quick": bool(args.quick), "size": asdict(size), "num_speculative_tokens": args.num_speculative_tokens,
                 "self_draft_layers": args.self_draft_layers, "draft_model": args.draft_model,
                 "draft_random_weights": args.draft_random_weights,
                 "concurrency": {"low": args.low_concurrency, "saturation": args.saturation_concurrency},
                 "workloads": wls, "loads": loads, "configs": {}, "cells": {}, "eval_guard": {}}
    base = EngineConfig(device=args.device, num_kv_blocks=args.num_kv_blocks, max_model_len=args.max_model_len,
                        max_num_seqs=max(args.saturation_concurrency, args.low_concurrency),
                        num_speculative_tokens=args.num_speculative_tokens, seed=args.seed,
                        self_draft_layers=args.self_draft_layers, draft_model=args.draft_model,
                        draft_random_weights=args.draft_random_weights)
    loaded = load_model(args.model, device=args.device, dtype=resolve_dtype(base), seed=args.seed)
    tok = loaded.tokenizer
    plan = {w: {"low": specs_for(w, tok, size.low_requests, size, args.seed),
                "saturation": specs_for(w, tok, size.sat_requests, size, args.seed)} for w in wls}
    conc = {"low": args.low_concurrency, "saturation": args.saturation_concurrency}
    ref_tokens: dict = {}
    ref_eval: list | None = None

    def run_cells(cfgs: list[Config]) -> None:
        """Every cell of these configurations, the configurations side by side within each cell (the
        box's load drifts over minutes: a cell's figures are taken close together)."""
        engines = {}
        for cfg in cfgs:
            rep["configs"][cfg.name] = asdict(cfg)
            rep["cells"][cfg.name] = {w: {} for w in wls}
            engines[cfg.name] = Engine(loaded, replace(base, **cfg.engine_overrides()))
        for w in wls:
            for ld in loads:
                for cfg in cfgs:
                    eng = engines[cfg.name]
                    fresh_core(eng)     # no prefix or suffix cache, no acceptance history from another cell
                    cell, toks = asyncio.run(run_cell(eng, plan[w][ld], conc[ld], f"{cfg.name} {w} {ld}",
                                                      not args.no_progress))
                    if cfg.name == "cb":
                        ref_tokens[(w, ld)] = toks
                    ref = ref_tokens.get((w, ld))
                    if ref is not None and toks:
                        cell["outputs_identical_to_cb"] = sum(1 for i, t in toks.items() if ref.get(i) == t) / len(toks)
                    rep["cells"][cfg.name][w][ld] = cell
                    print(_cell_line(cfg.name, w, ld, cell), flush=True)
        for cfg in cfgs:
            eng = engines.pop(cfg.name)
            if size.eval_subset > 0:
                eval_config(cfg.name, eng)
            del eng

    def eval_config(name: str, eng) -> None:
        nonlocal ref_eval
        fresh_core(eng)
        items, answers = eval_answers(eng, size.eval_subset)
        if name == "cb":
            ref_eval = answers
        g = rep["eval_guard"][name] = eval_guard(items, answers, None if name == "cb" else ref_eval)
        print(f"   eval guard {name}: {g['verdict']} (accuracy {100 * g['accuracy']:.1f}% on {g['n']}"
              + (f", {g['changed']} changed)" if "changed" in g else ")"), flush=True)

    configs = base_configs(methods, args.adaptive_method)
    run_cells(configs)
    spec_names = [c.name for c in configs if c.method != "off"]
    best = best_spec_config(rep, spec_names)
    if best is not None:
        b = next(c for c in configs if c.name == best)
        rep["best_spec_config"] = best
        run_cells([Config("cb+pc+best", prefix_caching=True, method=b.method, adaptive=True)])
    rep["goals"] = goals(rep)
    rep["seconds"] = time.perf_counter() - t_start
    end = machine_info(args.device)
    rep["machine"].update(torch_threads=end["torch_threads"], loadavg_end=end["loadavg_1_5_15"])
    return rep


def goals(rep: dict) -> dict:
    """The issue's two ratios (None where the run lacks a cell)."""
    c = rep["cells"]

    def cell(cfg, w, ld):
        return c.get(cfg, {}).get(w, {}).get(ld)
    out: dict = {"goal_low_copy_itl_ratio": GOAL_ITL_RATIO, "goal_saturation_tok_s_ratio": GOAL_THROUGHPUT_RATIO}
    a, b = cell("cb", "copy-heavy", "low"), cell("cb+prompt_lookup", "copy-heavy", "low")
    if a and b:
        r = _ratio(a["itl_ms"]["p50"], b["itl_ms"]["p50"])
        out["low_copy_itl_p50_cb_over_prompt_lookup"] = r
        out["low_copy_chunk_gap_p50_cb_over_prompt_lookup"] = _ratio(a["chunk_gap_ms"]["p50"], b["chunk_gap_ms"]["p50"])
        out["low_copy_itl_goal_met"] = None if r is None else r >= GOAL_ITL_RATIO
    sat = {}
    for w in rep["workloads"]:
        a, b = cell("cb", w, "saturation"), cell("cb+adaptive", w, "saturation")
        if a and b:
            sat[w] = _ratio(b["output_tok_s"], a["output_tok_s"])
    if sat:
        out["saturation_tok_s_adaptive_over_off"] = sat
        vals = [v for v in sat.values() if v is not None]
        out["saturation_tok_s_ratio_min"] = min(vals) if vals else None
        out["saturation_goal_met"] = bool(vals) and min(vals) >= GOAL_THROUGHPUT_RATIO
    return out


# ---- printing and plotting -----------------------------------------------------------------------------
def _f(v, fmt: str = ".1f", width: int = 7) -> str:
    return f"{v:>{width}{fmt}}" if v is not None else f"{'-':>{width}}"


HEADER = (f"{'config':<18} {'workload':<13} {'load':<10} {'ITL p50':>7} {'p99':>7} {'gap p50':>7} {'TTFT99':>7} "
          f"{'tok/s':>7} {'KVpeak':>6} {'accept':>6} {'tok/st':>6} {'=cb':>5}")


def _cell_line(cfg: str, w: str, ld: str, c: dict) -> str:
    s = c["spec"]
    acc = f"{100 * s['acceptance_rate']:5.0f}%" if s["acceptance_rate"] is not None else f"{'-':>6}"
    same = c.get("outputs_identical_to_cb")
    return (f"{cfg:<18} {w:<13} {ld:<10} {_f(c['itl_ms']['p50'])} {_f(c['itl_ms']['p99'])} "
            f"{_f(c['chunk_gap_ms']['p50'])} {_f(c['ttft_ms']['p99'], '.0f')} {_f(c['output_tok_s'])} "
            f"{c['kv']['blocks_used_peak']:>6} {acc} {_f(s['tokens_per_step'], '.2f', 6)} "
            f"{'' if same is None else f'{100 * same:.0f}%':>5}")


def print_report(rep: dict, out=sys.stdout) -> None:
    m = rep["machine"]
    print(f"== speculative decoding vs prefix caching vs continuous batching ({rep['model']}, "
          f"{'quick' if rep['quick'] else 'full'} run, k={rep['num_speculative_tokens']}, load average "
          f"{m.get('loadavg_1_5_15')} at start, {m.get('loadavg_end')} at end, {rep.get('seconds', 0):.0f} s)",
          file=out)
    print("   ms; ITL per token (a chunk of n tokens after a gap g: n x g/n), gap = per chunk; KV peak in blocks; "
          "=cb: requests whose greedy tokens equal cb's", file=out)
    print(HEADER, file=out)
    for cfg, by_w in rep["cells"].items():
        for w, by_l in by_w.items():
            for ld, c in by_l.items():
                print(_cell_line(cfg, w, ld, c), file=out)
    if rep["eval_guard"]:
        print("eval guard (greedy eval subset vs cb): " + "; ".join(
            f"{k} {g['verdict']}" + (f" ({g['changed']}/{g['n']} changed, acc {100 * g['accuracy']:.1f}%)"
                                      if "changed" in g else f" (acc {100 * g['accuracy']:.1f}%)")
            for k, g in rep["eval_guard"].items()), file=out)
    if rep.get("best_spec_config"):
        print(f"best speculating configuration (geometric mean of tok/s over cb across cells): "
              f"{rep['best_spec_config']}; cb+pc+best runs its method adaptively with prefix caching", file=out)
    g = rep.get("goals", {})
    if "low_copy_itl_p50_cb_over_prompt_lookup" in g:
        r = g["low_copy_itl_p50_cb_over_prompt_lookup"]
        gap = g.get("low_copy_chunk_gap_p50_cb_over_prompt_lookup")
        print(f"** low load, copy-heavy: ITL p50 cb / cb+prompt_lookup = {_f(r, '.2f', 0)}x (goal >= "
              f"{GOAL_ITL_RATIO}: {'met' if g['low_copy_itl_goal_met'] else 'missed'}); per-chunk gap p50 "
              f"ratio {_f(gap, '.2f', 0)}x", file=out)
    if "saturation_tok_s_adaptive_over_off" in g:
        cells = ", ".join(f"{w} {_f(v, '.2f', 0)}x" for w, v in g["saturation_tok_s_adaptive_over_off"].items())
        print(f"** saturation: output tok/s cb+adaptive / cb = {cells} (goal >= {GOAL_THROUGHPUT_RATIO} on each: "
              f"{'met' if g['saturation_goal_met'] else 'missed'})", file=out)


def plot(rep: dict, out_dir: str) -> list:
    """One row per load, one panel per workload: ITL p50 and output tok/s per configuration."""
    from pathlib import Path

    from bench import plots as P
    plt = P.plt
    cells = rep["cells"]
    names = list(cells)
    wls = rep["workloads"]
    loads = rep["loads"]
    paths = []
    for key, ylabel, fname in (("itl", "ITL p50 per token (ms)", "spec_itl_p50.png"),
                               ("tok_s", "output tokens/s", "spec_throughput.png")):
        fig, axes = plt.subplots(len(loads), len(wls), figsize=(4.8 * len(wls), 3.6 * len(loads)), squeeze=False)
        for i, ld in enumerate(loads):
            for j, w in enumerate(wls):
                ax = axes[i][j]
                vals = []
                for n in names:
                    c = cells[n].get(w, {}).get(ld)
                    vals.append(0 if c is None else (c["itl_ms"]["p50"] or 0) if key == "itl" else c["output_tok_s"])
                ax.bar(range(len(names)), vals, color=["tab:gray", "tab:green"] + ["tab:blue"] * (len(names) - 2))
                ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=7)
                ax.set_title(f"{w}, {ld} load", fontsize=9)
                ax.set_ylabel(ylabel, fontsize=8)
                ax.grid(alpha=0.3, axis="y")
        fig.suptitle(f"speculative decoding vs prefix caching ({rep['model']})")
        paths.append(P._save(fig, Path(out_dir) / fname))
    return paths


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rep = run(args)
    print_report(rep)
    save_outputs(rep, args.json_path, args.plot_dir, plot)
    failed = [k for k, g in rep["eval_guard"].items() if g["verdict"].startswith("FAIL")]
    if failed:
        print(f"eval guard failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
