"""Paged attention over a block KV cache: metadata for a flat mixed batch, the KV write, and attention.

KV cache per layer: (k_cache, v_cache), each [num_blocks, block_size, num_kv_heads, head_dim].
Flat batch layout: the prefill segments first (one per sequence, in order), then the decode tokens.
CPU (and CUDA prefill): torch SDPA. CUDA decode: the Triton kernel in `triton_attention` (imported
lazily, only for CUDA tensors), falling back to the torch path when Triton is unavailable.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor            # [T] int64, KV slot of each token (-1: padding, not written)
    # Token layout of the flat batch: first the prefill segments (query_len > 1), one per sequence in order, then the decode tokens (query_len == 1), one per sequence.
    prefill_query_lens: list[int]
    prefill_context_lens: list[int]       # KV length after this step incl. this chunk (cached prefix + chunk)
    prefill_block_tables: list[torch.Tensor]   # per prefill sequence, int64 block ids covering its context
    num_decode_tokens: int
    decode_context_lens: torch.Tensor | None   # [B] int32, KV length incl. the new token
    decode_block_tables: torch.Tensor | None   # [B, max_blocks] int32/int64, padded
    max_decode_context_len: int
    # Per-step values every layer would otherwise recompute (the gather indices and mask of the
    # decode attention, whether any slot is padding), filled by the first layer that needs them.
    step_cache: dict = field(default_factory=dict)


def build_attention_metadata(prefills: list[tuple[int, int, list[int]]], decodes: list[tuple[int, list[int]]],
                             block_size: int, device, max_blocks_per_seq: int | None = None) -> AttentionMetadata:
    """prefills: (query_len, context_len, block_table); decodes: (context_len, block_table).

    Token i of a prefill chunk sits at position context_len - query_len + i; a decode token at
    context_len - 1. slot = block_table[pos // block_size] * block_size + pos % block_size.
    """
    pieces: list[torch.Tensor] = []           # per prefill segment: its tokens' slots (tensor ops)
    pq, pc, pbt = [], [], []
    for ql, cl, bt in prefills:
        if ql <= 0 or cl < ql:
            raise ValueError(f"bad prefill segment: query_len={ql} context_len={cl}")
        if len(bt) * block_size < cl:
            raise ValueError(f"block table of {len(bt)} blocks too short for context {cl}")
        table = torch.tensor(bt, dtype=torch.int64)
        pos = torch.arange(cl - ql, cl, dtype=torch.int64)
        pieces.append(table[pos // block_size] * block_size + pos % block_size)
        pq.append(ql)
        pc.append(cl)
        pbt.append(table.to(device))
    dec_lens = []
    dec_tables = []
    dec_slots = []
    for cl, bt in decodes:
        if cl <= 0:
            raise ValueError(f"bad decode context_len={cl}")
        pos = cl - 1
        dec_slots.append(bt[pos // block_size] * block_size + pos % block_size)
        dec_lens.append(cl)
        dec_tables.append(bt)
    pieces.append(torch.tensor(dec_slots, dtype=torch.int64))
    slot_mapping = torch.cat(pieces).to(device)
    if decodes:
        width = max_blocks_per_seq if max_blocks_per_seq is not None else max(len(b) for b in dec_tables)
        width = max(width, 1)
        if any(len(bt) > width for bt in dec_tables):
            raise ValueError(f"a block table exceeds max_blocks_per_seq={width}")
        tab = torch.tensor([bt + [0] * (width - len(bt)) for bt in dec_tables], dtype=torch.int32)
        decode_block_tables = tab.to(device)
        decode_context_lens = torch.tensor(dec_lens, dtype=torch.int32, device=device)
        max_dec = max(dec_lens)
    else:
        decode_block_tables = decode_context_lens = None
        max_dec = 0
    return AttentionMetadata(
        slot_mapping=slot_mapping,
        prefill_query_lens=pq,
        prefill_context_lens=pc,
        prefill_block_tables=pbt,
        num_decode_tokens=len(decodes),
        decode_context_lens=decode_context_lens,
        decode_block_tables=decode_block_tables,
        max_decode_context_len=max_dec,
    )


# ------------------------------------------------------------------------------------------------
# Triton (CUDA only, lazily imported)

_triton_mod = None
_triton_checked = False


def _triton():
    """The triton_attention module, or None (no triton, or SWITCHYARD_ATTENTION_BACKEND=torch)."""
    global _triton_mod, _triton_checked
    if not _triton_checked:
        _triton_checked = True
        if os.environ.get("SWITCHYARD_ATTENTION_BACKEND", "").lower() != "torch":
            try:
                from workers.engine import triton_attention
                if triton_attention.available():
                    _triton_mod = triton_attention
            except Exception:  # pragma: no cover - no triton on this machine
                _triton_mod = None
    return _triton_mod


# ------------------------------------------------------------------------------------------------
# torch paths

def _once_per_step(step_cache: dict | None, key: str, compute):
    """compute(), kept in the step's AttentionMetadata.step_cache so later layers reuse it (no cache:
    computed every call)."""
    if step_cache is None:
        return compute()
    if key not in step_cache:
        step_cache[key] = compute()
    return step_cache[key]


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor, step_cache: dict | None = None) -> None:
    """Store k, v [T, kv_heads, head_dim] at flat slots (slot -1: skipped). `step_cache` (the
    metadata's) keeps the padding test to one per step instead of one per layer."""
    if k.shape[0] == 0:
        return
    if k_cache.is_cuda:
        tri = _triton()
        if tri is not None:
            tri.store_kv_cache(k, v, k_cache, v_cache, slot_mapping)
            return
    kc = k_cache.view(-1, *k_cache.shape[2:])
    vc = v_cache.view(-1, *v_cache.shape[2:])
    slots = slot_mapping
    # Drop padding slots (-1). On CUDA without Triton this is data-dependent (not graph-capturable).
    if k_cache.is_cuda or _once_per_step(step_cache, "padded", lambda: bool((slots < 0).any())):
        keep = slots >= 0
        slots, k, v = slots[keep], k[keep], v[keep]
    kc.index_copy_(0, slots, k if k.dtype == kc.dtype else k.to(kc.dtype))
    vc.index_copy_(0, slots, v if v.dtype == vc.dtype else v.to(vc.dtype))


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    """[context_len, kv_heads, head_dim] of one sequence, through its block table."""
    bs = cache.shape[1]
    nblk = (context_len + bs - 1) // bs
    return cache[block_table[:nblk]].flatten(0, 1)[:context_len]


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, query_len: int, context_len: int, block_table: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """One prefill chunk: q [Q, H, D] (fresh k, v [Q, KVH, D]) -> [Q, H, D]."""
    qh = q.transpose(0, 1).unsqueeze(0)                   # [1, H, Q, D]
    if context_len == query_len:
        kh = k.transpose(0, 1).unsqueeze(0)
        vh = v.transpose(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    else:
        kh = _gather_context(k_cache, block_table, context_len).transpose(0, 1).unsqueeze(0).to(q.dtype)
        vh = _gather_context(v_cache, block_table, context_len).transpose(0, 1).unsqueeze(0).to(q.dtype)
        prefix = context_len - query_len
        qpos = torch.arange(query_len, device=q.device)[:, None] + prefix
        kpos = torch.arange(context_len, device=q.device)[None, :]
        mask = kpos <= qpos                                 # [Q, C]
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def _decode_gather(block_tables: torch.Tensor, context_lens: torch.Tensor, L: int, block_size: int,
                   step_cache: dict | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flat KV slots [B * L] of every decode sequence's first L positions, and the length mask
    [B, 1, 1, L] (None when every sequence is L long, e.g. batch 1). Once per step, not per layer."""
    def compute():
        B = block_tables.shape[0]
        pos = torch.arange(L, device=block_tables.device)
        slots = block_tables.long().gather(1, (pos // block_size).expand(B, L)) * block_size + pos % block_size
        lens = context_lens.to(torch.int64).clamp(min=1)      # padding rows (len 0) attend to slot 0: no NaN
        full = not block_tables.is_cuda and bool((lens == L).all())   # a host check: never on CUDA (graphs)
        mask = None if full else (pos[None, :] < lens[:, None]).view(B, 1, 1, L)
        return slots.reshape(-1), mask
    return _once_per_step(step_cache, "decode_gather", compute)


def decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, max_context_len: int,
                           scale: float, step_cache: dict | None = None) -> torch.Tensor:
    """All decode tokens at once: q [B, H, D] -> [B, H, D], one batched SDPA with a length mask."""
    B = q.shape[0]
    L = max(int(max_context_len), 1)
    slots, mask = _decode_gather(block_tables, context_lens, L, k_cache.shape[1], step_cache)
    kvh, d = k_cache.shape[2], k_cache.shape[3]
    kh = k_cache.view(-1, kvh, d).index_select(0, slots).view(B, L, kvh, d).transpose(1, 2)   # [B, KVH, L, D]
    vh = v_cache.view(-1, kvh, d).index_select(0, slots).view(B, L, kvh, d).transpose(1, 2)
    if kh.dtype != q.dtype:
        kh, vh = kh.to(q.dtype), vh.to(q.dtype)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.squeeze(2)


def _decode(qd: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
            native: bool) -> torch.Tensor:
    """The decode tokens' attention on CPU: the native kernel (float32) or batched SDPA."""
    if native and qd.dtype == torch.float32 and k_cache.dtype == torch.float32:
        return torch.ops.switchyard.paged_decode_attention(qd, k_cache, v_cache, meta.decode_block_tables,
                                                           meta.decode_context_lens, scale)
    return decode_attention_torch(qd, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens,
                                  meta.max_decode_context_len, scale, meta.step_cache)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, native: bool = False) -> torch.Tensor:
    """Write the new k, v into the cache, then attend. q [T, H, D], k/v [T, KVH, D] -> [T, H, D].
    `native`: CPU decode attention through kernels/decode_ops.cpp (loaded by the caller)."""
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping, meta.step_cache)
    T = q.shape[0]
    n_prefill = sum(meta.prefill_query_lens)
    n_dec = meta.num_decode_tokens
    if n_prefill == 0 and n_dec == T and not q.is_cuda:   # decode-only step: no output buffer to fill
        return _decode(q, k_cache, v_cache, meta, scale, native)
    if n_prefill + n_dec < T:
        out = torch.zeros_like(q)
    else:
        out = torch.empty_like(q)
    off = 0
    for ql, cl, bt in zip(meta.prefill_query_lens, meta.prefill_context_lens, meta.prefill_block_tables):
        out[off:off + ql] = prefill_attention(q[off:off + ql], k[off:off + ql], v[off:off + ql], k_cache, v_cache,
                                              ql, cl, bt, scale)
        off += ql
    if n_dec:
        qd = q[off:off + n_dec]
        tri = _triton() if q.is_cuda else None
        if tri is not None:
            tri.paged_decode_attention(qd, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens,
                                       scale, out=out[off:off + n_dec])
        else:
            out[off:off + n_dec] = _decode(qd, k_cache, v_cache, meta, scale, native)
    return out
