"""The headline figures of bench/gpu_suite.sh, read from the JSON files its steps write.

    python -m bench.gpu_headlines OUT_DIR [STEP]   # one step's figures, or all of them

The suite calls it after each step, so the figures appear as soon as a step ends; each call also
rewrites OUT_DIR/headlines.md with every figure so far (a session cut short still has them).
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

# step key -> the JSON file(s) it reads, in OUT_DIR (gpu_suite.sh writes these names)
FILES = {
    "engine-8b": ["engine-offline-llama-8b.json"],
    "engine-1b-hf": ["engine-llama-1b-vs-hf.json"],
    "lora-8b": ["lora-llama-8b.json"],
    "stack-1b": ["serve-stack-llama-1b.json", "serve-inproc-llama-1b.json"],
}


def _f(x, fmt: str = ".1f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _pct(rep: dict | None, key: str, q: str) -> float | None:
    return ((rep or {}).get(key) or {}).get(q)


def engine_8b(rep: dict) -> list[str]:
    return [f"8B batch-1 decode: {_f(rep.get('decode_ms_per_step_bs1'), '.2f')} ms/step",
            f"8B offline {rep.get('num_requests')} requests x {rep.get('prompt_len')} prompt / "
            f"{rep.get('output_len')} output tokens: {_f(rep.get('engine_output_tok_s'))} output tok/s "
            f"({_f(rep.get('engine_seconds'))} s, {rep.get('engine_preemptions')} preemptions)"]


def engine_1b_hf(rep: dict) -> list[str]:
    lines = [f"1B offline {rep.get('num_requests')} requests (prompt {rep.get('prompt_len')}, output "
             f"{rep.get('output_len')}): ours {_f(rep.get('engine_output_tok_s'))} vs HF generate "
             f"{_f(rep.get('hf_output_tok_s'))} output tok/s = {_f(rep.get('speedup_vs_hf'), '.2f')}x "
             f"(HF static batches of {rep.get('hf_batch_size')})"]
    lines.append(f"1B batch-1 decode: ours {_f(rep.get('decode_ms_per_step_bs1'), '.2f')} vs HF "
                 f"{_f(rep.get('hf_decode_ms_per_step_bs1'), '.2f')} ms/step; greedy equal to HF: "
                 f"{rep.get('greedy_match_hf')}")
    return lines


def lora_8b(rep: dict) -> list[str]:
    return [f"LoRA 8B: mixed batch ({rep.get('adapters_in_batch')} adapters, {rep.get('requests_in_batch')} "
            f"requests) / base throughput = {_f(rep.get('mixed_over_base_throughput'), '.2f')} "
            f"(base {_f(rep.get('base_output_tok_s'))} output tok/s)",
            f"LoRA 8B swap: from disk p50 {_f(rep.get('swap_ms_p50'))} / p99 {_f(rep.get('swap_ms_p99'))} ms; "
            f"from host memory p50 {_f(rep.get('swap_ms_host_cached_p50'))} / p99 "
            f"{_f(rep.get('swap_ms_host_cached_p99'))} ms"]


def stack_1b(stack: dict | None, inproc: dict | None) -> list[str]:
    lines = []
    if stack:
        lines.append(f"1B stack, Poisson {_f((stack.get('load') or {}).get('rate'), 'g')} req/s: "
                     f"{stack.get('completed')}/{stack.get('num_requests')} ok, TTFT p99 "
                     f"{_f(_pct(stack, 'ttft_ms', 'p99'))} ms, ITL p99 {_f(_pct(stack, 'itl_ms', 'p99'))} ms, "
                     f"{_f(stack.get('output_tok_s'))} output tok/s")
    if inproc:
        lines.append(f"1B in-process, same load: TTFT p50 {_f(_pct(inproc, 'ttft_ms', 'p50'))} ms, "
                     f"p99 {_f(_pct(inproc, 'ttft_ms', 'p99'))} ms, ITL p99 {_f(_pct(inproc, 'itl_ms', 'p99'))} ms")
    a, b = _pct(stack, "ttft_ms", "p50"), _pct(inproc, "ttft_ms", "p50")
    if a is not None and b is not None:
        lines.append(f"1B stack minus in-process TTFT p50: {a - b:+.1f} ms ({a:.1f} vs {b:.1f})")
    return lines


SUMMARIES: dict[str, Callable[..., list[str]]] = {
    "engine-8b": engine_8b, "engine-1b-hf": engine_1b_hf, "lora-8b": lora_8b, "stack-1b": stack_1b}


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def headlines(out_dir: str | Path, step: str | None = None) -> list[str]:
    """The figure lines of one step (or of every step) whose JSON files exist in out_dir."""
    out = Path(out_dir)
    lines: list[str] = []
    for key in ([step] if step else list(FILES)):
        reps = [_load(out / name) for name in FILES[key]]
        if not any(reps):
            continue
        if key == "stack-1b":
            lines += stack_1b(*reps)
        else:
            lines += SUMMARIES[key](reps[0])
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or (len(argv) > 1 and argv[1] not in FILES):
        print(__doc__.strip() + f"\n\nSTEP: one of {', '.join(FILES)}", file=sys.stderr)
        return 2
    lines = headlines(argv[0], argv[1] if len(argv) > 1 else None)
    for line in lines or ["(no figures: the step wrote no JSON)"]:
        print(f"   >> {line}", flush=True)
    if Path(argv[0]).is_dir():   # every step's figures so far, for a session that ends early
        (Path(argv[0]) / "headlines.md").write_text("".join(f"- {line}\n" for line in headlines(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
