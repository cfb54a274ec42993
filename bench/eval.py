"""`switchyard eval`: the fixed eval set every optimisation is checked against (issue 19 item 5).

    switchyard eval [--inproc | --router ADDR] [--subset N] [--json PATH]   # accuracy + changed answers
    switchyard eval --write-baseline                                         # default in-process config
    switchyard eval --matrix [--subset N]                                    # every optimisation path

The set (bench/data/eval_set.jsonl, written by bench/data/make_eval_set.py) is a few hundred short
few-shot completion prompts - capitals, facts, arithmetic, copying, upper-casing, number sequences -
run greedily, stopping at the first newline, and scored by exact match of that line after
normalisation (`score`). Besides accuracy, the run is compared with a stored baseline of exact output
token ids (bench/data/eval_baseline.json, from the default in-process configuration): `changed` is
the share of answers whose tokens differ. A path whose maths is exact must change none; one that only
reorders a summation (the GGUF block kernels, MKL's sgemm at another batch shape) may flip near-ties,
and must keep accuracy within a point.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).with_name("data")
SET_PATH = DATA / "eval_set.jsonl"
BASELINE_PATH = DATA / "eval_baseline.json"
STOP = ["\n"]                      # every answer is one line
MODEL = "smollm2-135m"
ACCURACY_TOLERANCE = 0.01          # a path that is not exact may move accuracy by at most one point

_PUNCT = ".,!?;:"
_QUOTES = "\"'`“”‘’"
_ARTICLES = ("the ", "a ", "an ")


# ---- the set and its scoring -----------------------------------------------------------------------
def load_set(path: str | os.PathLike = SET_PATH, subset: int | None = None) -> list[dict]:
    """The items of the set; `subset` N keeps N of them spread evenly over the file (so over every
    category, which the file lists in blocks), the same N items every time."""
    items = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if subset is not None and 0 < subset < len(items):
        items = [items[(k * len(items)) // subset] for k in range(subset)]
    return items


def set_digest(items: list[dict]) -> str:
    """Identifies the prompts and settings a baseline was recorded on (not the answers or scoring)."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it["id"], it["prompt"], it["max_tokens"]]).encode())
    return h.hexdigest()[:16]


def normalize(text: str, case_sensitive: bool = False) -> str:
    """The first line, trimmed of whitespace, surrounding quotes and trailing punctuation, internal
    whitespace collapsed; unless case-sensitive also lower-cased and without a leading article."""
    s = text.strip().split("\n", 1)[0] if text.strip() else ""
    s = " ".join(s.split())
    prev = None
    while s != prev:
        prev = s
        s = s.strip(_QUOTES).rstrip(_PUNCT).strip()
    if not case_sensitive:
        s = s.lower()
        for a in _ARTICLES:
            if s.startswith(a):
                s = s[len(a):]
                break
    return s


def score(text: str, item: dict) -> bool:
    """Exact match of the normalised answer line against any of the item's answers."""
    cs = bool(item.get("case_sensitive", False))
    got = normalize(text, cs)
    return any(got == normalize(a, cs) for a in item["answers"])


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    cached_tokens: int = 0         # prompt tokens found in the prefix cache (in-process runs)
    prompt_tokens: int = 0
    logprobs: list[float] | None = None   # the sampled tokens' logprobs (in-process runs)


# ---- running it ------------------------------------------------------------------------------------
def sampling_for(item: dict):
    from workers.engine.sampling_params import SamplingParams
    return SamplingParams(max_tokens=int(item["max_tokens"]), temperature=0.0, stop=list(STOP), logprobs=True)


def run_engine(eng, items: list[dict], adapter_ids: list[str | None] | None = None) -> list[Answer]:
    """All items through one `Engine.generate` call (continuous batching, greedy; the sampled tokens'
    logprobs too, which greedy decoding does not read)."""
    outs = eng.generate([it["prompt"] for it in items], [sampling_for(it) for it in items],
                        adapter_ids=adapter_ids)
    return [Answer(o.text, list(o.token_ids), o.num_cached_tokens, len(o.prompt_token_ids), o.logprobs)
            for o in outs]


def run_router(router: str, items: list[dict], *, model: str | None = None, concurrency: int = 32,
               timeout: float = 300.0) -> list[Answer]:
    """The same requests over gRPC `Inference/Generate`, `concurrency` streams at a time."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from common.rpc import options
    from protos.switchyard.v1 import common_pb2, inference_pb2, inference_pb2_grpc

    with grpc.insecure_channel(router, options=options()) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)

        def one(item: dict) -> Answer:
            sampling = common_pb2.SamplingParams(max_tokens=int(item["max_tokens"]), temperature=0.0, stop=STOP)
            req = inference_pb2.GenerateRequest(model=model or "", intent="" if model else "auto",
                                                prompt=item["prompt"], sampling=sampling)
            text, ids = [], []
            for resp in stub.Generate(req, timeout=timeout):
                text.append(resp.text)
                ids.extend(resp.token_ids)
            return Answer("".join(text), ids)

        with ThreadPoolExecutor(max(1, concurrency)) as pool:
            return list(pool.map(one, items))


def build_engine(**overrides):
    """The default in-process engine (EngineConfig's defaults) with `overrides`; the model is loaded
    afresh each time, since the CPU kernels and GGUF blocks are attached to the loaded model itself."""
    from batcher.engine import Engine
    return Engine.from_model(MODEL, **overrides)


# ---- reporting -------------------------------------------------------------------------------------
def load_baseline(path: str | os.PathLike = BASELINE_PATH) -> dict | None:
    p = Path(path)
    return json.loads(p.read_text()) if p.exists() else None


def evaluate(items: list[dict], answers: list[Answer], baseline: dict | None = None) -> dict:
    """Accuracy per category and overall; with a baseline, how many answers' token ids differ."""
    per: dict[str, list[int]] = {}
    wrong: list[str] = []
    for it, a in zip(items, answers):
        ok = score(a.text, it)
        c = per.setdefault(it["category"], [0, 0])
        c[0] += ok
        c[1] += 1
        if not ok:
            wrong.append(it["id"])
    n = len(items)
    res: dict = {"n": n, "accuracy": sum(c[0] for c in per.values()) / max(1, n),
                 "categories": {k: {"n": t, "correct": ok, "accuracy": ok / t} for k, (ok, t) in per.items()},
                 "wrong_ids": wrong}
    if baseline is not None:
        base = baseline.get("token_ids", {})
        changed = [it["id"] for it, a in zip(items, answers) if it["id"] in base and base[it["id"]] != a.token_ids]
        compared = sum(1 for it in items if it["id"] in base)
        res.update(changed=len(changed), changed_share=len(changed) / max(1, compared), compared=compared,
                   changed_ids=changed)
        # how far the arithmetic moved where the tokens did not: the largest difference of a sampled
        # token's logprob from the baseline's, over the answers whose tokens are unchanged
        base_lp = baseline.get("logprobs", {})
        diffs = [abs(x - y) for it, a in zip(items, answers)
                 if a.logprobs and it["id"] in base_lp and it["id"] not in changed
                 for x, y in zip(a.logprobs, base_lp[it["id"]])]
        if diffs:
            res["max_logprob_diff"] = max(diffs)
        if compared < n:
            res["not_in_baseline"] = n - compared
    return res


def baseline_doc(items: list[dict], answers: list[Answer], eng) -> dict:
    from dataclasses import asdict
    cfg = {k: v for k, v in asdict(eng.config).items() if k != "lora_adapters"}
    return {"model": MODEL, "set": SET_PATH.name, "set_digest": set_digest(items), "config": cfg,
            "accuracy": evaluate(items, answers)["accuracy"],
            "token_ids": {it["id"]: a.token_ids for it, a in zip(items, answers)},
            "logprobs": {it["id"]: a.logprobs for it, a in zip(items, answers)},
            "text": {it["id"]: a.text for it, a in zip(items, answers)}}


def format_report(res: dict) -> str:
    lines = [f"{'category':<10} {'n':>4} {'correct':>8} {'accuracy':>9}"]
    for k, c in res["categories"].items():
        lines.append(f"{k:<10} {c['n']:>4} {c['correct']:>8} {100 * c['accuracy']:>8.1f}%")
    lines.append(f"{'overall':<10} {res['n']:>4} {round(res['accuracy'] * res['n']):>8} {100 * res['accuracy']:>8.1f}%")
    if "changed" in res:
        lines.append(f"changed vs baseline: {res['changed']}/{res['compared']} answers "
                     f"({100 * res['changed_share']:.1f}%)"
                     + (f"; unchanged ones' logprobs within {res['max_logprob_diff']:.1e}"
                        if "max_logprob_diff" in res else "")
                     + (f": {', '.join(res['changed_ids'][:12])}{' ...' if res['changed'] > 12 else ''}"
                        if res["changed"] else ""))
    elif "baseline" in res:
        lines.append(f"changed vs baseline: n/a ({res['baseline']})")
    return "\n".join(lines)


def run_set(items: list[dict], *, router: str | None = None, model: str | None = None, eng=None,
            baseline: dict | None = None) -> tuple[dict, list[Answer]]:
    """One run of `items` (through the router, or the given / default in-process engine), evaluated."""
    t0 = time.perf_counter()
    if router:
        answers = run_router(router, items, model=model)
    else:
        eng = eng or build_engine()
        answers = run_engine(eng, items)
    res = evaluate(items, answers, baseline)
    res["seconds"] = time.perf_counter() - t0
    return res, answers


def eval_summary(eng, subset: int | None = None) -> dict:
    """`subset` items on an existing engine, for a benchmark's JSON: accuracy and answers changed vs the
    baseline (the baseline is the default CPU configuration: another device or dtype changes some)."""
    items = load_set(subset=subset)
    baseline = load_baseline()
    if baseline is not None and baseline.get("set_digest") != set_digest(load_set()):
        baseline = None
    res, _ = run_set(items, eng=eng, baseline=baseline)
    out = {k: res[k] for k in ("n", "accuracy", "changed", "compared", "changed_share", "seconds") if k in res}
    out["categories"] = {k: round(c["accuracy"], 4) for k, c in res["categories"].items()}
    print(f"eval: accuracy {100 * res['accuracy']:.1f}% on {res['n']} items"
          + (f", {res['changed']}/{res['compared']} answers changed vs the baseline" if "changed" in res else ""),
          flush=True)
    return out


# ---- the optimisation matrix -----------------------------------------------------------------------
@contextlib.contextmanager
def _env(**kv: str):
    old = {k: os.environ.get(k) for k in kv}
    os.environ.update(kv)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def matrix_paths() -> list[tuple[str, str, dict, dict]]:
    """(name, exactness expected, EngineConfig overrides, how to run) for each optimisation path.

    "exact": the same arithmetic as the default, so no token may change; "near": another summation
    order or batch shape somewhere, so near-ties may flip (accuracy must stay within a point)."""
    lora = {"max_loras": 4}   # the default; the adapters go into slots before the run (`adapters`)
    return [
        ("default (baseline config)", "exact", {}, {}),
        ("cpu kernels off (SWITCHYARD_CPU_KERNELS=0)", "near", {}, {"env": {"SWITCHYARD_CPU_KERNELS": "0"}}),
        ("gguf blocks off (block_weights=False)", "near", {"block_weights": False}, {}),
        ("max_loras=0 (no LoRA manager)", "exact", {"max_loras": 0}, {}),
        ("2 adapters in slots, base requests only", "exact", lora, {"adapters": True}),
        ("2 adapters in slots, base rows among adapter rows", "near", lora, {"adapters": True, "mixed": True}),
        ("batch 1 (max_num_seqs=1)", "near", {"max_num_seqs": 1}, {}),
        ("chunked prefill (max_num_batched_tokens=32)", "near", {"max_num_batched_tokens": 32}, {}),
        ("unchunked (max_num_batched_tokens=8192)", "near", {"max_num_batched_tokens": 8192}, {}),
        ("prefix cache off (every prompt a miss)", "near", {"enable_prefix_caching": False}, {}),
        ("prefix cache warm (2nd run on one engine)", "near", {}, {"twice": True}),
    ]


def active_paths(eng) -> dict:
    """What the engine really runs: native kernels, projections on GGUF blocks, adapters registered."""
    model = eng.runner.model
    return {"native_kernels": bool(getattr(model, "fused_cpu_ops", False)),
            "block_projections": sum(getattr(m, "blocks", None) is not None for m in model.modules()),
            "adapters": len(eng.adapters()) if eng.runner.lora is not None else None}


def write_adapters(root: Path, model_config) -> None:
    from bench.lora_bench import write_peft_adapter
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    write_peft_adapter(root / "a", model_config, r=8, alpha=16, targets=targets, seed=1, std=0.05)
    write_peft_adapter(root / "b", model_config, r=4, alpha=8, targets=["q_proj", "v_proj"], seed=2)


def run_matrix(items: list[dict], baseline: dict | None, only: list[str] | None = None) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="switchyard-eval-") as tmp:
        adapter_dir = Path(tmp)
        # A subset runs in other batches than the baseline did, so no path is the baseline's exact arithmetic
        full = baseline is not None and len(items) == len(baseline.get("token_ids", {}))
        base_acc = baseline_accuracy(items, baseline)
        for name, expect, overrides, how in matrix_paths():
            if only and not any(o.lower() in name.lower() for o in only):
                continue
            expect = expect if full else "near"
            t0 = time.perf_counter()
            with _env(**how.get("env", {})):
                eng = build_engine(**overrides)
            names = []
            if how.get("adapters"):
                if not (adapter_dir / "a").exists():
                    write_adapters(adapter_dir, eng.loaded.config)
                names = ["eval-a", "eval-b"]
                for n, sub in zip(names, ("a", "b")):
                    eng.load_adapter(n, str(adapter_dir / sub))
            if how.get("mixed"):
                # each base request next to one on an adapter, in the same batches; only base rows scored
                doubled = [it for it in items for _ in (0, 1)]
                ids = [None if k % 2 == 0 else names[(k // 2) % len(names)] for k in range(len(doubled))]
                both = run_engine(eng, doubled, adapter_ids=ids)
                answers = both[0::2]
                # the adapters are live: their rows answer differently from the base rows beside them
                adapter_rows_differ = sum(a.token_ids != b.token_ids for a, b in zip(both[0::2], both[1::2]))
            elif how.get("twice"):
                run_engine(eng, items)
                answers = run_engine(eng, items)
            else:
                answers = run_engine(eng, items)
            res = evaluate(items, answers, baseline)
            res.update(path=name, expect=expect, seconds=time.perf_counter() - t0, overrides=overrides,
                       env=how.get("env", {}), **active_paths(eng))
            if how.get("mixed"):
                res["adapter_rows_differing_from_base"] = adapter_rows_differ
            # prompt tokens served from the prefix cache (whole blocks only: a prompt's last partial block
            # is always computed; the few-shot prefixes are shared within one run too)
            res["prefix_hit_share"] = (sum(a.cached_tokens for a in answers)
                                       / max(1, sum(a.prompt_tokens for a in answers)))
            rows.append(res)
            line = format_matrix_row(res, base_acc)
            res["verdict"] = line.split("  ")[-1]
            print(line, flush=True)
            del eng
    return rows


MATRIX_HEADER = f"{'path':<50} {'accuracy':>9} {'Δacc':>6} {'changed':>9} {'max|Δlogp|':>10} {'cached':>7}  verdict"


def baseline_accuracy(items: list[dict], baseline: dict | None) -> float | None:
    """The baseline's accuracy on these items (a subset too), scored from its stored answers."""
    if not baseline or "text" not in baseline or any(it["id"] not in baseline["text"] for it in items):
        return None
    return evaluate(items, [Answer(baseline["text"][it["id"]], []) for it in items])["accuracy"]


def format_matrix_row(res: dict, base_acc: float | None) -> str:
    delta = None if base_acc is None else res["accuracy"] - base_acc
    changed = f"{res['changed']}/{res['compared']}" if "changed" in res else "n/a"
    if "changed" not in res:
        verdict = "no baseline"
    elif res["changed"] == 0:
        verdict = "identical tokens"
    elif res["expect"] == "exact":
        verdict = "FAIL: expected identical tokens"
    else:
        verdict = "within tolerance" if delta is None or abs(delta) <= ACCURACY_TOLERANCE + 1e-9 else "FAIL: accuracy"
    lp = f"{res['max_logprob_diff']:.1e}" if "max_logprob_diff" in res else "-"
    cached = f"{100 * res['prefix_hit_share']:.0f}%" if "prefix_hit_share" in res else "-"
    return (f"{res['path']:<50} {100 * res['accuracy']:>8.1f}% "
            f"{'' if delta is None else f'{100 * delta:+.1f}':>6} {changed:>9} {lp:>10} {cached:>7}  {verdict}")


# ---- the command -----------------------------------------------------------------------------------
def add_arguments(ap: argparse.ArgumentParser) -> None:
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--router", default=None, metavar="ADDR",
                       help="run the set through a running stack's router (gRPC Inference/Generate)")
    where.add_argument("--inproc", action="store_true",
                       help="run it on an in-process engine with the default configuration (the default)")
    ap.add_argument("--model", default=None, help="with --router: the model to ask for (default: the router's)")
    ap.add_argument("--subset", type=int, default=None, metavar="N", help="N items spread over every category")
    ap.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="also write the result here")
    ap.add_argument("--baseline", default=str(BASELINE_PATH), metavar="PATH",
                    help="stored baseline of output token ids (default bench/data/eval_baseline.json)")
    ap.add_argument("--write-baseline", action="store_true",
                    help="run the whole set in-process on the default configuration; store its tokens as the baseline")
    ap.add_argument("--matrix", action="store_true",
                    help="in-process: every optimisation path (kernels, GGUF blocks, LoRA, batch size, chunked "
                         "prefill, prefix cache) against the baseline")
    ap.add_argument("--only", action="append", default=None, metavar="TEXT",
                    help="with --matrix: only the paths whose name contains TEXT (repeatable)")
    ap.add_argument("--verbose", "-v", action="store_true", help="print every wrong answer")


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    if args is None:
        ap = argparse.ArgumentParser(prog="switchyard eval", description=__doc__.splitlines()[0])
        add_arguments(ap)
        args = ap.parse_args(argv)
    items = load_set(subset=args.subset)

    if args.write_baseline:
        if args.router or args.subset or args.matrix:
            print("switchyard eval: --write-baseline runs the whole set in-process (no --router/--subset/--matrix)",
                  file=sys.stderr)
            return 2
        eng = build_engine()
        answers = run_engine(eng, items)
        doc = baseline_doc(items, answers, eng)
        doc["n"] = len(items)
        Path(args.baseline).write_text(json.dumps(doc, indent=None, ensure_ascii=False, separators=(",", ":")) + "\n")
        print(format_report(evaluate(items, answers)))
        print(f"baseline written to {args.baseline}")
        return 0

    baseline = load_baseline(args.baseline)
    if baseline is not None and baseline.get("set_digest") != set_digest(load_set()):
        print(f"switchyard eval: {args.baseline} was recorded on another version of the set; "
              "regenerate it with --write-baseline", file=sys.stderr)
        baseline = None

    if args.matrix:
        if args.router:
            print("switchyard eval: --matrix runs in-process (it builds one engine per path)", file=sys.stderr)
            return 2
        print(f"eval matrix: {len(items)} items, each path on a fresh in-process engine", flush=True)
        print(MATRIX_HEADER, flush=True)
        rows = run_matrix(items, baseline, args.only)
        base_acc = baseline_accuracy(items, baseline)
        out = {"n": len(items), "baseline_accuracy": base_acc, "accuracy_tolerance": ACCURACY_TOLERANCE,
               "paths": rows}
        failed = [r["path"] for r in rows if r["verdict"].startswith("FAIL")]
        if failed:
            print(f"switchyard eval --matrix: {len(failed)} path(s) failed: {', '.join(failed)}", file=sys.stderr)
        if args.json_path:
            _write(args.json_path, out)
        return 1 if failed else 0

    res, answers = run_set(items, router=args.router, model=args.model, baseline=baseline)
    if baseline is None:
        res["baseline"] = f"none at {args.baseline}"
    res["where"] = args.router or "in-process"
    print(format_report(res))
    print(f"({len(items)} items in {res['seconds']:.1f} s, {res['where']})")
    if args.verbose:
        for it, a in zip(items, answers):
            if it["id"] in res["wrong_ids"]:
                print(f"  wrong {it['id']:<14} want {it['answers'][0]!r:<24} got {a.text!r}")
    if args.json_path:
        _write(args.json_path, res)
    return 0


def _write(path: str, obj: dict) -> None:
    from bench.common import write_json
    write_json(path, obj)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
