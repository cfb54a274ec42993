"""`switchyard bench step`: the host side of one engine step, with the forward replaced by a no-op.

On a GPU the model's forward is a few milliseconds; everything around it (scheduling, laying out
the step's inputs, sampling launches, detokenizing and stop checks) is Python on the host, and it
must not grow with the model's context (`max_model_len`) or it becomes the step. This benchmark
drives the real Scheduler, ModelRunner input preparation, Sampler and EngineCore post-processing
at a fixed decode batch, with a model whose forward returns zeros of the right shape and whose
logits are a small precomputed table (the GPU's [batch, vocab] argmax is device work, not host
work), and prints host milliseconds per decode step for each batch and `max_model_len`, measured
side by side (alternating rounds, median of rounds).

    switchyard bench step [--batch-sizes 1,64,256] [--max-model-lens 2048,131072] [--json out.json]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import machine_info, write_json

_VOCAB = 512            # the no-op logits' width (sampling launches are the same; the argmax is tiny)


class NullModel(torch.nn.Module):
    """Stands in for LlamaForCausalLM: reads nothing, computes nothing, returns the right shapes.

    Its logits make each row pick a different ordinary token (so the detokenizer does real work)
    and never EOS."""

    def __init__(self, max_rows: int, hidden: int = 8):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)   # dtype/device probe
        self.fused_cpu_ops = False
        self.hidden = hidden
        tokens = 300 + torch.arange(max_rows) % 150
        self.logits = torch.zeros(max_rows, _VOCAB)
        self.logits[torch.arange(max_rows), tokens % _VOCAB] = 1.0
        self.last_num_tokens = 0

    def relayout_for_cpu(self) -> None:
        pass

    def use_cpu_kernels(self, on: bool = True) -> None:
        pass

    def forward(self, input_ids, positions, attn_meta, kv_caches, lora=None) -> torch.Tensor:
        self.last_num_tokens = input_ids.shape[0]
        return torch.zeros(input_ids.shape[0], self.hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits[:hidden.shape[0]]


def build_engine(batch: int, max_model_len: int, prompt_len: int, steps: int):
    """An Engine over NullModel with room for `batch` sequences of prompt_len + steps tokens."""
    from batcher.engine import Engine
    from workers.engine.config import EngineConfig, ModelConfig
    from workers.engine.loader import LoadedModel, load_model

    tok = load_model("random", random_weights="tiny").tokenizer
    mc = ModelConfig(vocab_size=_VOCAB, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                     num_attention_heads=1, num_key_value_heads=1, head_dim=8,
                     max_position_embeddings=max_model_len, eos_token_ids=[0])
    loaded = LoadedModel(name="null", config=mc, model=NullModel(max(batch, 1)), tokenizer=tok, path=None)
    per_seq = -(-(prompt_len + steps + 64) // 16)
    cfg = EngineConfig(num_kv_blocks=batch * per_seq + 16, max_num_seqs=batch,
                       max_num_batched_tokens=max(2048, batch), max_model_len=max_model_len,
                       use_cuda_graphs=False, cpu_kernels=False, max_loras=0, max_waiting=batch)
    return Engine(loaded, cfg)


def run_round(batch: int, max_model_len: int, prompt_len: int, steps: int, seed: int = 0) -> dict:
    """Admit `batch` requests, prefill them, then time `steps` decode steps part by part."""
    from workers.engine.sampling_params import SamplingParams

    eng = build_engine(batch, max_model_len, prompt_len, steps)
    g = torch.Generator().manual_seed(seed)
    sp = SamplingParams(max_tokens=steps + 1000, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        prompt = torch.randint(1000, 40000, (prompt_len,), generator=g).tolist()
        eng.add_request(prompt, sp, request_id=f"r{i}")
    while eng.scheduler.num_waiting or any(r.num_computed_tokens < r.num_tokens - 1 for r in eng.scheduler.running):
        eng.step()
    core, runner = eng.core, eng.runner
    for _ in range(3):            # settle into steady decode
        eng.step()
    sched, prep, proc, total = [], [], [], []
    written = []
    for _ in range(steps):
        t0 = time.perf_counter()
        plan = core.schedule()
        t1 = time.perf_counter()
        result = runner.execute(plan)
        t2 = time.perf_counter()
        core.process(result)
        t3 = time.perf_counter()
        assert runner.model.last_num_tokens == batch, "not a pure decode step"
        sched.append(t1 - t0)
        prep.append(t2 - t1)
        proc.append(t3 - t2)
        total.append(t3 - t0)
        written.append(getattr(runner, "last_step_input_bytes", None))
    ms = lambda xs: 1000 * statistics.median(xs)   # noqa: E731
    return {"batch": batch, "max_model_len": max_model_len, "steps": steps,
            "host_ms_per_step": ms(total), "schedule_ms": ms(sched), "execute_ms": ms(prep),
            "process_ms": ms(proc), "input_bytes_per_step": written[-1]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="switchyard bench step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-sizes", default="1,64,256")
    ap.add_argument("--max-model-lens", default="2048,131072")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=100, help="timed decode steps per round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per (batch, max_model_len)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the host side is one thread)")
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = [int(x) for x in args.batch_sizes.split(",")]
    lens = [int(x) for x in args.max_model_lens.split(",")]
    info = machine_info("cpu")
    print(f"bench step: load average {info['loadavg_1_5_15']}, {args.rounds} rounds x {args.steps} decode steps, "
          f"prompt {args.prompt_len} tokens")
    rows = []
    for b in batches:
        per_len: dict[int, list[dict]] = {L: [] for L in lens}
        for r in range(args.rounds):
            for L in (lens if r % 2 == 0 else lens[::-1]):      # alternate the order: drift hits both
                per_len[L].append(run_round(b, L, args.prompt_len, args.steps, seed=r))
        for L in lens:
            rs = per_len[L]
            med = {k: statistics.median(x[k] for x in rs) for k in
                   ("host_ms_per_step", "schedule_ms", "execute_ms", "process_ms")}
            rows.append({"batch": b, "max_model_len": L, **med, "input_bytes_per_step": rs[-1]["input_bytes_per_step"],
                         "rounds_host_ms": [x["host_ms_per_step"] for x in rs]})
    print(f"{'batch':>5} {'max_model_len':>13} {'host ms/step':>12} {'schedule':>9} {'execute':>8} "
          f"{'process':>8} {'input bytes':>11}")
    for r in rows:
        print(f"{r['batch']:>5} {r['max_model_len']:>13} {r['host_ms_per_step']:>12.3f} {r['schedule_ms']:>9.3f} "
              f"{r['execute_ms']:>8.3f} {r['process_ms']:>8.3f} {str(r['input_bytes_per_step']):>11}")
    ratios = {}
    if len(lens) >= 2:
        lo, hi = min(lens), max(lens)
        for b in batches:
            a = next(r for r in rows if r["batch"] == b and r["max_model_len"] == lo)
            z = next(r for r in rows if r["batch"] == b and r["max_model_len"] == hi)
            ratios[b] = z["host_ms_per_step"] / a["host_ms_per_step"]
            print(f"batch {b}: {hi} / {lo} host time ratio {ratios[b]:.3f}")
    info_end = machine_info("cpu")
    print(f"load average at end {info_end['loadavg_1_5_15']}")
    if args.json:
        write_json(args.json, {"machine": {**info, "loadavg_end": info_end["loadavg_1_5_15"]},
                               "args": vars(args), "rows": rows, "ratio_long_over_short": ratios})
    return 0
