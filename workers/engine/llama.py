"""Llama-family decoder (Llama 2/3, SmolLM/SmolLM2, Qwen2-style q/k/v biases) over a paged KV cache.

One forward runs a flat batch of tokens from many sequences (prefill chunks and decode tokens mixed),
described by `AttentionMetadata`. q/k/v and gate/up projections are fused; `load_weights` takes a
HF-named state dict and fuses it.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from workers.engine.attention import AttentionMetadata, paged_attention
from workers.engine.config import ModelConfig
from workers.engine.rope import RotaryEmbedding, apply_rope


def _param(shape, device, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device=device, dtype=dtype), requires_grad=False)


def _proj(shape, device, dtype, bias: bool = False) -> nn.Module:
    """A projection: `weight` [out, in] (+ `bias`), and `blocks`, the GGUF blocks of the same weight
    when block_weights.attach_block_weights gave it some (small-batch CPU matmuls)."""
    m = nn.Module()
    m.weight = _param(shape, device, dtype)
    m.bias = _param((shape[0],), device, dtype) if bias else None
    m.blocks = None
    return m


def linear(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x @ mod.weight.T (+ bias), through the block kernel for a few rows when the weight has blocks."""
    bw = mod.blocks
    if bw is not None and x.shape[0] <= bw.max_rows:
        y = bw.linear(x)
        return y if mod.bias is None else y + mod.bias
    return F.linear(x, mod.weight, mod.bias)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = _param((size,), device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:   # one fused op, bit-identical to the steps below for float32
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # as HF LlamaRMSNorm: normalise in float32, cast back, then scale
        dt = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dt)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.layer_idx = 0
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.native = False      # float32 CPU: decode attention through the native kernel (use_cpu_kernels)
        self.qkv_proj = _proj((self.q_size + 2 * self.kv_size, cfg.hidden_size), device, dtype, cfg.attention_bias)
        self.o_proj = _proj((cfg.hidden_size, self.q_size), device, dtype)

    def forward(self, x, cos, sin, meta: AttentionMetadata, kv_cache, lora=None):
        T = x.shape[0]
        qkv = linear(self.qkv_proj, x)
        if lora is not None:
            lora.apply(self.layer_idx, 0, x, qkv)
        # q and k rotate together: one set of rope ops for both (the same per-element products)
        qk = apply_rope(qkv[:, :self.q_size + self.kv_size].view(T, self.num_heads + self.num_kv_heads, self.head_dim),
                        cos, sin)
        q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        v = qkv[:, self.q_size + self.kv_size:].view(T, self.num_kv_heads, self.head_dim)
        o = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, self.native).reshape(T, self.q_size)
        out = linear(self.o_proj, o)
        if lora is not None:
            lora.apply(self.layer_idx, 1, o, out)
        return out


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.layer_idx = 0
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = _proj((2 * cfg.intermediate_size, cfg.hidden_size), device, dtype)
        self.down_proj = _proj((cfg.hidden_size, cfg.intermediate_size), device, dtype)

    def forward(self, x, lora=None):
        if lora is None:
            gate, up = linear(self.gate_up_proj, x).split(self.intermediate_size, dim=-1)
            return linear(self.down_proj, F.silu(gate) * up)
        gu = linear(self.gate_up_proj, x)
        lora.apply(self.layer_idx, 2, x, gu)
        gate, up = gu.split(self.intermediate_size, dim=-1)
        h = F.silu(gate) * up
        out = linear(self.down_proj, h)
        lora.apply(self.layer_idx, 3, h, out)
        return out


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, device, dtype)
        self.mlp = LlamaMLP(cfg, device, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device, dtype)

    def forward(self, h, cos, sin, meta, kv_cache, lora=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, meta, kv_cache, lora)
        return h + self.mlp(self.post_attention_layernorm(h), lora)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.embed_tokens = nn.Module()
        self.embed_tokens.weight = _param((cfg.vocab_size, cfg.hidden_size), device, dtype)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, device, dtype) for _ in range(cfg.num_hidden_layers))
        for i, layer in enumerate(self.layers):   # LoRA slots are stacked per layer index
            layer.self_attn.layer_idx = layer.mlp.layer_idx = i
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device, dtype)


def _fuse(parts: list[torch.Tensor], device, dtype) -> torch.Tensor:
    """torch.cat(parts, 0) on device/dtype; a zero-copy view when the parts already lie back to back
    in one storage (as our GGUF conversion writes them and the mmap reader loads them)."""
    p0 = parts[0]
    same = all(p.dtype == dtype and p.is_contiguous() and p.device == p0.device for p in parts) and \
        (device is None or p0.device == torch.device(device)) and p0.device.type == "cpu"
    if same:
        try:
            st = p0.untyped_storage()
            adjacent = all(p.untyped_storage().data_ptr() == st.data_ptr() for p in parts) and all(
                a.storage_offset() + a.numel() == b.storage_offset() for a, b in zip(parts, parts[1:]))
        except RuntimeError:   # a tensor without a plain storage (meta, tensor subclasses): copy
            adjacent = False
        if adjacent:
            rows = sum(p.shape[0] for p in parts)
            shape = (rows, *p0.shape[1:])
            return p0.new_empty(0).set_(st, p0.storage_offset(), shape)
    return torch.cat([p.to(device=device if device is not None else p.device, dtype=dtype) for p in parts], 0)


_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class LlamaForCausalLM(nn.Module):
    """forward(input_ids [T], positions [T], attn_meta, kv_caches) -> hidden [T, H];
    compute_logits(hidden [N, H]) -> float32 logits [N, vocab]."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.config = cfg
        dtype = dtype or torch.get_default_dtype()
        self.model = LlamaModel(cfg, device, dtype)
        self.lm_head = _proj((cfg.vocab_size, cfg.hidden_size), "meta" if cfg.tie_word_embeddings else device, dtype)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        max_pos = max(int(cfg.max_position_embeddings or 0), 1)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, max_pos, cfg.rope_theta, cfg.rope_scaling, device)
        self.fused_cpu_ops = False   # see use_cpu_kernels

    def use_cpu_kernels(self, on: bool = True) -> None:
        """Run float32 CPU forwards through the native kernels (workers/engine/kernels/, loaded by
        the caller): each residual add fused with the following RMSNorm, and the decode attention
        as one op. Small decode steps are dominated by per-op dispatch, not arithmetic."""
        self.fused_cpu_ops = on
        for layer in self.model.layers:
            layer.self_attn.native = on

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    # ------------------------------------------------------------------ compute
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], lora=None) -> torch.Tensor:
        """`lora`: a workers.engine.lora.LoraBatch adding per-token adapter deltas, or None (no cost)."""
        h = F.embedding(input_ids, self.model.embed_tokens.weight)
        cos, sin = self.rotary_emb(positions, h.dtype)
        if self.fused_cpu_ops and h.dtype == torch.float32 and h.device.type == "cpu":
            return self._forward_fused(h, cos, sin, attn_meta, kv_caches, lora)
        for layer, kv in zip(self.model.layers, kv_caches):
            h = layer(h, cos, sin, attn_meta, kv, lora)
        return self.model.norm(h)

    def forward_first_layers(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_meta: AttentionMetadata,
                             kv_caches: list[tuple[torch.Tensor, torch.Tensor]], num_layers: int) -> torch.Tensor:
        """Layers 0..num_layers-1 then the final norm: hidden [T, H] for compute_logits. A self-draft
        (workers/engine/draft_model.py): the target's early layers and its head, writing the KV of
        those layers only (kv_caches[:num_layers])."""
        h = F.embedding(input_ids, self.model.embed_tokens.weight)
        cos, sin = self.rotary_emb(positions, h.dtype)
        layers = self.model.layers[:num_layers]
        if self.fused_cpu_ops and h.dtype == torch.float32 and h.device.type == "cpu":
            return self._forward_fused(h, cos, sin, attn_meta, kv_caches, None, layers)
        for layer, kv in zip(layers, kv_caches):
            h = layer(h, cos, sin, attn_meta, kv)
        return self.model.norm(h)

    def _forward_fused(self, h, cos, sin, meta, kv_caches, lora, layers=None) -> torch.Tensor:
        """The same layers with every residual add fused into the RMSNorm that follows it (the next
        layer's input norm, or the final norm): one op instead of two per add. `layers`: a leading
        slice of the model's layers (forward_first_layers), all of them when None."""
        add_norm = torch.ops.switchyard.add_rms_norm
        layers = self.model.layers if layers is None else layers
        x = layers[0].input_layernorm(h)
        for i, (layer, kv) in enumerate(zip(layers, kv_caches)):
            post = layer.post_attention_layernorm
            h, x = add_norm(h, layer.self_attn(x, cos, sin, meta, kv, lora), post.weight, post.eps)
            nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm
            h, x = add_norm(h, layer.mlp(x, lora), nxt.weight, nxt.eps)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(self.lm_head, hidden).float()

    # ------------------------------------------------------------------ weights
    def load_weights(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load a HF-named state dict (q/k/v and gate/up separate), fusing as needed.

        Tensors are assigned (no copy into pre-initialised storage) after moving to this model's
        device/dtype; the module may have been built on the `meta` device.
        """
        cfg = self.config
        dev = self.model.norm.weight.device
        if dev.type == "meta":
            dev = None
        dtype = self.dtype
        target = dev

        def conv(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=target if target is not None else t.device, dtype=dtype)

        def put(mod: nn.Module, name: str, t: torch.Tensor) -> None:
            setattr(mod, name, nn.Parameter(conv(t).contiguous(), requires_grad=False))

        per_layer: dict[int, dict[str, torch.Tensor]] = {}
        seen = set()
        for name, t in state_dict.items():
            m = _LAYER_RE.match(name)
            if m:
                per_layer.setdefault(int(m.group(1)), {})[m.group(2)] = t
                continue
            if name == "model.embed_tokens.weight":
                put(self.model.embed_tokens, "weight", t)
            elif name == "model.norm.weight":
                put(self.model.norm, "weight", t)
            elif name == "lm_head.weight":
                if cfg.tie_word_embeddings:
                    continue
                put(self.lm_head, "weight", t)
            elif name.endswith("rotary_emb.inv_freq"):
                continue
            elif strict:
                raise KeyError(f"unexpected weight {name!r}")
            seen.add(name)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        elif "lm_head.weight" not in state_dict and strict:
            raise KeyError("missing lm_head.weight (model is not tied)")
        for name in ("model.embed_tokens.weight", "model.norm.weight"):
            if name not in seen and strict:
                raise KeyError(f"missing {name}")

        for i, layer in enumerate(self.model.layers):
            w = per_layer.pop(i, {})
            try:
                attn, mlp = layer.self_attn, layer.mlp
                qkv = _fuse([w.pop(f"self_attn.{p}_proj.weight") for p in "qkv"], target, dtype)
                attn.qkv_proj.weight = nn.Parameter(qkv, requires_grad=False)
                if cfg.attention_bias:
                    b = _fuse([w.pop(f"self_attn.{p}_proj.bias") for p in "qkv"], target, dtype)
                    attn.qkv_proj.bias = nn.Parameter(b, requires_grad=False)
                put(attn.o_proj, "weight", w.pop("self_attn.o_proj.weight"))
                gu = _fuse([w.pop("mlp.gate_proj.weight"), w.pop("mlp.up_proj.weight")], target, dtype)
                mlp.gate_up_proj.weight = nn.Parameter(gu, requires_grad=False)
                put(mlp.down_proj, "weight", w.pop("mlp.down_proj.weight"))
                put(layer.input_layernorm, "weight", w.pop("input_layernorm.weight"))
                put(layer.post_attention_layernorm, "weight", w.pop("post_attention_layernorm.weight"))
            except KeyError as e:
                if strict:
                    raise KeyError(f"layer {i}: missing weight {e}") from None
            w = {k: v for k, v in w.items() if not k.endswith("rotary_emb.inv_freq")}
            if w and strict:
                raise KeyError(f"layer {i}: unexpected weights {sorted(w)}")
        if per_layer and strict:
            raise KeyError(f"weights for layers beyond num_hidden_layers: {sorted(per_layer)}")
        if self.rotary_emb.cos_cache.numel() == 0 or self.rotary_emb.cos_cache.device != self.device:
            if self.device.type != "meta":
                self.rotary_emb.build(self.device)

    @torch.no_grad()
    def relayout_for_cpu(self) -> None:
        """Store projection weights as [in, out] (exposed as the usual [out, in] transposed view).

        On CPU, `F.linear` over that layout runs the small-batch matmuls of decode steps (4-32 rows)
        about 1.6-2x faster than over [out, in]; large batches are unchanged. Idempotent; a copy
        of the weights, so it is done once when an engine is built, not per step. A tied lm_head
        stays as is (the embedding lookup wants rows)."""
        mods = [m for layer in self.model.layers
                for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                          layer.mlp.gate_up_proj, layer.mlp.down_proj)]
        if not self.config.tie_word_embeddings:
            mods.append(self.lm_head)
        for m in mods:
            w = m.weight
            if w.device.type == "cpu" and w.dim() == 2 and w.is_contiguous():
                m.weight = nn.Parameter(w.t().contiguous().t(), requires_grad=False)

    @torch.no_grad()
    def init_random_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Random normal(0, std) matrices, unit norms, zero biases; generated on the weights' device."""
        dev = self.device
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=gen)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under HF names (q/k/v and gate/up split again), as views."""
        cfg = self.config
        out = {"model.embed_tokens.weight": self.model.embed_tokens.weight.data,
               "model.norm.weight": self.model.norm.weight.data}
        if not cfg.tie_word_embeddings:
            out["lm_head.weight"] = self.lm_head.weight.data
        for i, layer in enumerate(self.model.layers):
            a, m = layer.self_attn, layer.mlp
            pre = f"model.layers.{i}."
            q, k, v = a.qkv_proj.weight.data.split([a.q_size, a.kv_size, a.kv_size], 0)
            out[pre + "self_attn.q_proj.weight"], out[pre + "self_attn.k_proj.weight"] = q, k
            out[pre + "self_attn.v_proj.weight"] = v
            if a.qkv_proj.bias is not None:
                qb, kb, vb = a.qkv_proj.bias.data.split([a.q_size, a.kv_size, a.kv_size], 0)
                out[pre + "self_attn.q_proj.bias"], out[pre + "self_attn.k_proj.bias"] = qb, kb
                out[pre + "self_attn.v_proj.bias"] = vb
            out[pre + "self_attn.o_proj.weight"] = a.o_proj.weight.data
            g, u = m.gate_up_proj.weight.data.split(m.intermediate_size, 0)
            out[pre + "mlp.gate_proj.weight"], out[pre + "mlp.up_proj.weight"] = g, u
            out[pre + "mlp.down_proj.weight"] = m.down_proj.weight.data
            out[pre + "input_layernorm.weight"] = layer.input_layernorm.weight.data
            out[pre + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight.data
        return out
