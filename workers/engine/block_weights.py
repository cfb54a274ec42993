"""A GGUF model's block-quantized weights, kept as the file stores them, for small-batch CPU matmuls.

A model loaded from GGUF runs on the float32 weights dequantized from its blocks (the converted
cache). Decode steps of a few rows are bound by reading those weights: a Q4_1 block holds 32
weights in 20 bytes, their float32 copy takes 128. So each projection also keeps its blocks
(q/k rows un-permuted and q/k/v, gate/up concatenated exactly as the float32 weights are) and,
for at most `max_rows` rows, multiplies through the native kernels (kernels/block_linear.cpp),
which compute x . dequantize(W) from the blocks: the same weights, only the float summation
order differs. Larger batches (prefill, decode of more than ~24 sequences) keep the float32 matmuls:
they are compute-bound there and MKL's sgemm wins (measured crossover on a 2-core AVX-512 box).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

log = logging.getLogger("switchyard.engine")

QK = 32                                          # weights per block
# GGUF block layouts: fp16 scales first, then the quants
BLOCK_BYTES = {"q4_1": 20, "q8_0": 34}
SCALES = {"q4_1": 2, "q8_0": 1}                  # d, m (Q4_1) / d (Q8_0)


@dataclass
class BlockWeight:
    """One projection's weight [out_features, in_features] as GGUF blocks, split for the kernels:
    `qs` uint8 [out, blocks * quant bytes] and `scales` float32 [out, blocks, 1 or 2] (the fp16
    scales widened, exactly)."""
    fmt: str
    qs: torch.Tensor
    scales: torch.Tensor
    in_features: int
    max_rows: int                                # rows of x up to which the block kernel is used
    op: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def from_blocks(cls, fmt: str, blocks: np.ndarray, in_features: int, max_rows: int = 4, op=None) -> "BlockWeight":
        """From GGUF bytes, uint8 [out, in / 32 * block bytes]."""
        rows = blocks.shape[0]
        b = np.ascontiguousarray(blocks).reshape(rows, -1, BLOCK_BYTES[fmt])
        ns = SCALES[fmt]
        scales = b[:, :, :2 * ns].copy().view(np.float16).astype(np.float32)      # [out, blocks, ns]
        qs = np.ascontiguousarray(b[:, :, 2 * ns:]).reshape(rows, -1)
        return cls(fmt, torch.from_numpy(qs), torch.from_numpy(np.ascontiguousarray(scales)), in_features, max_rows, op)

    @property
    def out_features(self) -> int:
        return self.qs.shape[0]

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] float32 -> [M, out] float32."""
        return self.op(x, self.qs, self.scales)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight, with gguf's arithmetic: (d * q) + m for Q4_1, d * q for Q8_0."""
        nb = self.in_features // QK
        d = self.scales[..., 0:1]
        if self.fmt == "q4_1":
            q = self.qs.view(self.out_features, nb, 16)
            q = torch.cat([q & 0x0F, q >> 4], -1).float()          # low nibbles: weights 0..15
            w = (d * q) + self.scales[..., 1:2]
        else:
            w = d * self.qs.view(torch.int8).view(self.out_features, nb, QK).float()
        return w.reshape(self.out_features, self.in_features)


def read_gguf_blocks(path: str, n_head: int, n_kv_heads: int) -> dict[str, tuple[str, np.ndarray]]:
    """HF weight name -> (format, uint8 [rows, bytes]) for every Q4_1 / Q8_0 matrix in the file,
    q/k rows in HF's rotate-half order (the order the float32 cache holds).

    Parsing a GGUF's metadata (its whole vocabulary, in Python) takes seconds, so the result is
    kept as `gguf_blocks.safetensors` in the file's conversion cache folder and memory-mapped
    from there afterwards."""
    from workers.engine.gguf_convert import cache_dir_for
    cache = cache_dir_for(path) / "gguf_blocks.safetensors"
    if cache.exists():
        from workers.engine.loader import read_safetensors_mmap
        out = {}
        for key, t in read_safetensors_mmap(cache).items():
            name, fmt = key.rsplit("|", 1)
            out[name] = (fmt, t.numpy())
        return out
    out = _parse_gguf_blocks(path, n_head, n_kv_heads)
    if cache.parent.is_dir():
        import os
        import uuid
        from workers.engine.gguf_convert import save_safetensors
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            save_safetensors({f"{name}|{fmt}": torch.from_numpy(np.array(a, copy=True))
                              for name, (fmt, a) in out.items()}, tmp)
            os.replace(tmp, cache)
        except OSError as e:   # a read-only cache: parse again next time
            log.warning("could not cache GGUF blocks at %s: %s", cache, e)
        finally:
            tmp.unlink(missing_ok=True)
    return out


def _parse_gguf_blocks(path: str, n_head: int, n_kv_heads: int) -> dict[str, tuple[str, np.ndarray]]:
    import gguf
    from workers.engine.gguf_convert import hf_name, unpermute_qk_rows
    kinds = {gguf.GGMLQuantizationType.Q4_1: "q4_1", gguf.GGMLQuantizationType.Q8_0: "q8_0"}
    out: dict[str, tuple[str, np.ndarray]] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        fmt = kinds.get(t.tensor_type)
        name = hf_name(t.name)
        if fmt is None or name is None:
            continue
        data = np.asarray(t.data)
        if ".attn_q." in t.name:
            data = np.ascontiguousarray(unpermute_qk_rows(data, n_head))
        elif ".attn_k." in t.name:
            data = np.ascontiguousarray(unpermute_qk_rows(data, n_kv_heads))
        out[name] = (fmt, data)
    return out


def _block_weight(parts: list[tuple[str, np.ndarray] | None], weight: torch.Tensor, max_rows: int,
                  ops: dict) -> BlockWeight | None:
    """The blocks of `weight` (concatenated parts), or None when a part is not a block format or the
    blocks do not dequantize to the float32 weight's first and last rows."""
    if any(p is None for p in parts) or len({p[0] for p in parts}) != 1:
        return None
    fmt = parts[0][0]
    data = np.concatenate([p[1] for p in parts], 0)
    out_f, in_f = weight.shape
    if in_f % QK or data.shape != (out_f, in_f // QK * BLOCK_BYTES[fmt]):
        return None
    probe = BlockWeight.from_blocks(fmt, data[[0, out_f - 1]], in_f)
    if not torch.equal(probe.dequantize(), weight[[0, out_f - 1]].float()):
        return None   # the float32 cache is not these blocks: never mix two different weights
    return BlockWeight.from_blocks(fmt, data, in_f, max_rows, ops[fmt])


def projections(model):
    """(module, the HF weight names it holds, fused in this order) for every matmul blocks can serve."""
    for i, layer in enumerate(model.model.layers):
        pre = f"model.layers.{i}."
        a, m = layer.self_attn, layer.mlp
        yield a.qkv_proj, [pre + f"self_attn.{p}_proj.weight" for p in "qkv"]
        yield a.o_proj, [pre + "self_attn.o_proj.weight"]
        yield m.gate_up_proj, [pre + "mlp.gate_proj.weight", pre + "mlp.up_proj.weight"]
        yield m.down_proj, [pre + "mlp.down_proj.weight"]
    yield model.lm_head, ["model.embed_tokens.weight" if model.config.tie_word_embeddings else "lm_head.weight"]


def attach_block_weights(model, gguf_path: str, max_rows: int = 16) -> int:
    """Give each projection of `model` (float32, CPU) its GGUF blocks; returns how many got them.

    Needs the native kernels; without them (or for formats other than Q4_1 / Q8_0) the projection
    keeps only its float32 weight. A model that already has all its blocks (an earlier engine on
    the same loaded model) only takes the new `max_rows`."""
    from workers.engine.kernels.build import load
    if not load():
        return 0
    mods = list(projections(model))
    if all(mod.blocks is not None for mod, _ in mods):
        for mod, _ in mods:
            mod.blocks.max_rows = max_rows
        return len(mods)
    ops = {"q4_1": torch.ops.switchyard.q4_1_linear, "q8_0": torch.ops.switchyard.q8_0_linear}
    cfg = model.config
    blocks = read_gguf_blocks(gguf_path, cfg.num_attention_heads, cfg.num_key_value_heads)
    for mod, names in mods:
        mod.blocks = _block_weight([blocks.get(k) for k in names], mod.weight, max_rows, ops)
    n = sum(mod.blocks is not None for mod, _ in mods)
    log.info("block kernels serve %d projections of %s", n, gguf_path)
    return n
