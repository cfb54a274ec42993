"""Helpers shared by the benchmarks (engine_bench, overhead, serve, compare)."""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
from pathlib import Path


def machine_info(device: str | None = None) -> dict:
    """What ran the benchmark, including the load average (these boxes are shared)."""
    import torch
    gpu = None
    if (device or "").startswith("cuda") or (device is None and torch.cuda.is_available()):
        try:
            gpu = torch.cuda.get_device_name()
        except Exception:
            gpu = None
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "loadavg_1_5_15": load}


def write_json(path: str | os.PathLike, obj: dict) -> Path:
    """Strict JSON (NaN and infinities become null)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(clean_json(obj), indent=1, allow_nan=False))
    return p


def save_outputs(rep: dict, json_path: str | None, plot_dir: str | None = None, plot=None) -> None:
    """A benchmark's report to `json_path` and `plot(rep, plot_dir)`'s figures to `plot_dir` (each only
    when given), saying where they went."""
    if json_path:
        write_json(json_path, rep)
        print(f"wrote {json_path}")
    if plot_dir and plot is not None:
        print("plots: " + ", ".join(str(p) for p in plot(rep, plot_dir)))


def clean_json(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): clean_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean_json(v) for v in x]
    if hasattr(x, "item"):          # numpy / torch scalars
        return clean_json(x.item())
    return x


def stack_config(model: str = "smollm2-135m", config_path: str | None = None, **overrides):
    """A StackConfig on free ports (the benchmarks start their own stack unless given --router)."""
    from common.config import load_config
    ports = dict(router_port=0, nats_port=0, kv_manager_port=0, worker_base_port=0)
    return load_config(config_path, **{**ports, "model": model, **overrides})


@contextlib.contextmanager
def local_stack(cfg):
    """Start a real stack (nats, kv_manager, router, workers) for the duration of the block."""
    from services.launcher import Stack
    stack = Stack(cfg).start()
    ok = False
    try:
        yield stack
        ok = True
    finally:
        stack.stop(drain=False)
        if ok:   # keep the logs of a run that failed
            stack.remove_workdir()


def hf_config(c) -> dict:
    """Our ModelConfig as transformers' LlamaConfig kwargs."""
    return dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
                rope_theta=c.rope_theta, rope_scaling=c.rope_scaling,
                max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings)


def load_hf_model(loaded, device):
    """transformers' model on the same weights as our LoadedModel (same dtype, eval mode)."""
    from transformers import AutoModelForCausalLM
    dtype = next(loaded.model.parameters()).dtype
    if loaded.path:
        return AutoModelForCausalLM.from_pretrained(loaded.path, dtype=dtype).to(device).eval()
    from transformers import LlamaConfig, LlamaForCausalLM  # random weights: same tensors, HF module
    hf = LlamaForCausalLM(LlamaConfig(**hf_config(loaded.config))).to(device, dtype).eval()
    hf.load_state_dict(loaded.model.hf_state_dict(), strict=False)
    return hf
