"""PEFT-layout LoRA adapters with seeded random weights, written by `peft` itself, and HF+peft
reference outputs (shared by tests/test_lora.py and `switchyard bench lora`)."""
from __future__ import annotations

from pathlib import Path

import torch


def import_peft():
    import peft
    return peft


ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_adapter(hf_model, out_dir: str | Path, *, seed: int, r: int = 8, alpha: float = 16.0,
                      targets: list[str] | None = None, std: float = 0.05, use_rslora: bool = False,
                      **extra) -> Path:
    """Wrap hf_model (not modified: PEFT injects layers, which we remove again) with a LoRA config,
    fill A and B with seeded normal(0, std) weights and save_pretrained into out_dir."""
    peft = import_peft()
    LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or ALL_TARGETS, lora_dropout=0.0,
                     bias="none", use_rslora=use_rslora, task_type="CAUSAL_LM", **extra)
    pm = get_peft_model(hf_model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    out = Path(out_dir)
    pm.save_pretrained(str(out))
    pm.unload()        # strip the LoRA layers: hf_model is the bare base model again
    return out


def peft_reference(hf_model, adapter_dir: str | Path | None, prompts: list[list[int]], max_new: int):
    """Greedy tokens and first-step logits from transformers + peft (adapter_dir None: the base)."""
    PeftModel = import_peft().PeftModel

    model = PeftModel.from_pretrained(hf_model, str(adapter_dir)) if adapter_dir else hf_model
    toks, first = [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            first.append(model(input_ids=ids).logits[0, -1].float())
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                 do_sample=False, pad_token_id=0, eos_token_id=None)
            toks.append(out[0, len(p):].tolist())
    if adapter_dir:
        model.unload()
    return toks, first
