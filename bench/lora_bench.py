"""`switchyard bench lora [--json PATH]`: LoRA adapters on our engine.

Reports
* swap_ms_p50 / swap_ms_p99: request to first use of a rank-16 adapter that is in no slot and not in
  host memory (read + validate the PEFT folder, evict the LRU slot, copy into it);
  swap_ms_host_cached_p50 / _p99: the same when the adapter sits in the host LRU (the usual swap).
  On CUDA the slot write is asynchronous (side stream); these include waiting for it to land.
* mixed_over_base_throughput: output tok/s of a batch spread over `adapters_in_batch` adapters
  (two requests each) over the same batch on the bare base model; per LoRA path too (sgmv, bmm, bgmv;
  triton on CUDA).
* match_peft: greedy tokens equal transformers + peft on a fixed prompt set (HF-layout models only).
* adapter_host_mb (one rank-16 adapter in host memory) and slot_device_mb (one slot on the device).

Adapters are written in the PEFT layout (adapter_config.json + adapter_model.safetensors) with
seeded random weights, for any model shape (`--model random:llama-8b --device cuda` on a GPU).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from batcher.engine import Engine
from bench.common import machine_info, write_json
from bench.metrics import pct
from workers.engine.config import EngineConfig
from workers.engine.loader import load_model
from workers.engine.lora import SUPPORTED_TARGETS, module_dims
from workers.engine.model_runner import resolve_dtype
from workers.engine.sampling_params import SamplingParams

MATCH_PROMPTS = ["The capital of France is", "def quicksort(xs):", "Water boils at", "My favourite colour is"]


def write_peft_adapter(path: Path, model_config, *, r: int, alpha: float, targets, seed: int,
                       std: float = 0.03) -> Path:
    """A PEFT-layout LoRA folder with seeded normal(0, std) A and B (what peft.save_pretrained writes)."""
    from safetensors.torch import save_file
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    dims = module_dims(model_config)
    sd = {}
    for i in range(model_config.num_hidden_layers):
        for m in targets:
            fin, fout = dims[m]
            part = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            pre = f"base_model.model.model.layers.{i}.{part}.{m}"
            sd[f"{pre}.lora_A.weight"] = (torch.randn((r, fin), generator=g) * std).contiguous()
            sd[f"{pre}.lora_B.weight"] = (torch.randn((fout, r), generator=g) * std).contiguous()
    save_file(sd, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": list(targets), "bias": "none", "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": False, "modules_to_save": None, "base_model_name_or_path": ""}))
    return path


def measure_swaps(loaded, cfg: EngineConfig, adapters: dict[str, Path], trials: int) -> dict:
    eng = Engine(loaded, EngineConfig(**{**vars(cfg), "max_loras": 2, "lora_adapters": {}}))
    mgr = eng.runner.lora
    for n, p in adapters.items():
        mgr.register(n, p)
    names = list(adapters)
    cuda = mgr.device.type == "cuda"

    def swap(name: str) -> float:
        t0 = time.perf_counter()
        mgr.acquire(name)
        if cuda:                    # the slot write runs on a side stream: time it until it has landed
            torch.cuda.synchronize(mgr.device)
        return 1000 * (time.perf_counter() - t0)
    swap(names[0])                  # allocate the slot stacks outside the timings
    cold, warm = [], []
    for i in range(trials):
        name = names[(i + 1) % len(names)]
        mgr._host.pop(name, None)   # not in host memory either: a read from disk
        cold.append(swap(name))
    for n in names:
        mgr.prefetch(n)
    for i in range(trials):
        warm.append(swap(names[(i + 1) % len(names)]))
    # request to first token, swap included vs adapter already in a slot (same prompt, 1 token)
    sp = SamplingParams(max_tokens=1, temperature=0.0)

    def ttft(name: str) -> float:
        t0 = time.perf_counter()
        eng.generate("The capital of France is", sp, adapter_ids=[name])
        return 1000 * (time.perf_counter() - t0)
    ttft_swap, ttft_hot = [], []
    for i in range(min(trials, 10)):
        a, b = names[(2 * i) % len(names)], names[(2 * i + 1) % len(names)]
        ttft_swap.append(ttft(a))
        ttft_hot.append(ttft(a))
        del b
    mem = mgr.memory_bytes()
    return {"swap_ms_p50": pct(cold, 50), "swap_ms_p99": pct(cold, 99),
            "swap_ms_host_cached_p50": pct(warm, 50), "swap_ms_host_cached_p99": pct(warm, 99),
            "ttft_ms_with_swap_p50": statistics.median(ttft_swap), "ttft_ms_adapter_resident_p50": statistics.median(ttft_hot),
            "slot_device_mb": mem["device_bytes_per_slot"] / 2**20,
            "adapter_host_mb": mgr.prefetch(names[0]).nbytes / 2**20}


def throughput(loaded, cfg: EngineConfig, adapters: dict[str, Path], n_adapters: int, mode: str,
               prompts, out_len: int, use_adapters: bool) -> dict:
    eng = Engine(loaded, EngineConfig(**{**vars(cfg), "max_loras": n_adapters, "lora_mode": mode,
                                         "lora_adapters": {k: str(v) for k, v in adapters.items()}}))
    names = list(adapters)[:n_adapters]
    ids = [names[i % n_adapters] if use_adapters else None for i in range(len(prompts))]
    sp = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    if use_adapters:
        for n in names:
            eng.load_adapter(n, str(adapters[n]))
    eng.generate(prompts[:2], SamplingParams(max_tokens=2, temperature=0.0), adapter_ids=ids[:2])  # warm up
    t0 = time.perf_counter()
    outs = eng.generate(prompts, sp, adapter_ids=ids)
    dt = time.perf_counter() - t0
    toks = sum(len(o.token_ids) for o in outs)
    return {"output_tok_s": toks / dt, "seconds": dt, "adapters_in_batch": len({i for i in ids if i})}


def match_peft(loaded, cfg: EngineConfig, adapters: dict[str, Path], n_new: int) -> dict:
    if not loaded.path:
        return {"match_peft": None, "reason": "random-weight model: no HF folder for transformers + peft"}
    import transformers

    from bench.peft_reference import import_peft
    peft = import_peft()
    hf = transformers.AutoModelForCausalLM.from_pretrained(loaded.path, dtype=torch.float32).eval()
    eng = Engine(loaded, EngineConfig(**{**vars(cfg), "lora_adapters": {k: str(v) for k, v in adapters.items()}}))
    prompts = [loaded.tokenizer.encode(p) for p in MATCH_PROMPTS]
    sp = SamplingParams(max_tokens=n_new, temperature=0.0, ignore_eos=True)
    ok, total = 0, 0
    for name in list(adapters)[:2]:
        pm = peft.PeftModel.from_pretrained(hf, str(adapters[name]))
        ours = [o.token_ids for o in eng.generate(prompts, sp, adapter_ids=[name] * len(prompts))]
        with torch.no_grad():
            for p, mine in zip(prompts, ours):
                ids = torch.tensor([p])
                ref = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                  do_sample=False, pad_token_id=0, eos_token_id=None)[0, len(p):].tolist()
                ok += ref == mine
                total += 1
        hf = pm.unload()
    return {"match_peft": ok == total, "match_peft_sequences": f"{ok}/{total}"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="switchyard bench lora", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="built-in name, HF folder, or random:<shape>")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="all", help="all | qv | comma list of q_proj,k_proj,...")
    ap.add_argument("--adapters", type=int, default=8, help="adapters in the mixed batch")
    ap.add_argument("--requests-per-adapter", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--out-len", type=int, default=32)
    ap.add_argument("--swap-trials", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3, help="base/mixed run pairs per LoRA path")
    ap.add_argument("--no-peft", action="store_true", help="skip the transformers + peft comparison")
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args(argv)

    cfg = EngineConfig(device=args.device, max_lora_rank=max(16, args.rank), num_kv_blocks=512,
                       max_num_batched_tokens=1024, max_num_seqs=64)
    random_weights = args.model.split(":", 1)[1] if args.model.startswith("random:") else None
    loaded = load_model("random" if random_weights else args.model, device=args.device,
                        dtype=resolve_dtype(cfg), random_weights=random_weights)
    targets = (list(SUPPORTED_TARGETS) if args.targets == "all" else ["q_proj", "v_proj"] if args.targets == "qv"
               else args.targets.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="sy-lora-bench-"))
    adapters = {f"lora{i}": write_peft_adapter(tmp / f"lora{i}", loaded.config, r=args.rank, alpha=2 * args.rank,
                                               targets=targets, seed=i)
                for i in range(max(args.adapters, 3))}

    res: dict = {"bench": "lora", "model": args.model, "device": args.device, "rank": args.rank,
                 "targets": targets, "machine": machine_info(args.device)}
    res.update(measure_swaps(loaded, cfg, adapters, args.swap_trials))

    tok = loaded.tokenizer
    pool = tok.encode(" ".join(f"Item {i}: the train from station {i} leaves at {i % 24}:00." for i in range(200)))
    n_req = args.adapters * args.requests_per_adapter
    prompts = [pool[i * 7:i * 7 + args.prompt_len] for i in range(n_req)]
    # Base and mixed runs alternate, `rounds` times each, and each ratio is mixed over the base run
    # beside it (median over rounds): on a shared box the background load drifts between runs.
    modes = ("auto", "sgmv", "bmm", "bgmv") + (("triton",) if args.device.startswith("cuda") else ())
    base_runs: list[float] = []
    ratios: dict[str, list[float]] = {m: [] for m in modes}
    mixed: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for mode in modes:
            b = throughput(loaded, cfg, adapters, args.adapters, mode, prompts, args.out_len, use_adapters=False)
            m = throughput(loaded, cfg, adapters, args.adapters, mode, prompts, args.out_len, use_adapters=True)
            base_runs.append(b["output_tok_s"])
            mixed[mode].append(m["output_tok_s"])
            ratios[mode].append(m["output_tok_s"] / b["output_tok_s"])
            res["adapters_in_batch"] = m["adapters_in_batch"]
    res["base_output_tok_s"] = statistics.median(base_runs)
    for mode in modes:
        res[f"mixed_output_tok_s_{mode}"] = statistics.median(mixed[mode])
        res[f"mixed_over_base_throughput_{mode}"] = statistics.median(ratios[mode])
    res["rounds"] = args.rounds
    res["mixed_over_base_throughput"] = res["mixed_over_base_throughput_auto"]
    res["requests_in_batch"] = n_req
    if not args.no_peft:
        res.update(match_peft(loaded, cfg, {k: adapters[k] for k in list(adapters)[:2]}, 16))
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items() if k != "machine"},
                     indent=1))
    if args.json:
        write_json(args.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
