"""Paged attention over a block KV cache: metadata for a flat mixed batch, the KV write, and attention.

KV cache per layer: (k_cache, v_cache), each [num_blocks, block_size, num_kv_heads, head_dim].
Flat batch layout: the prefill segments first (one per sequence, in order), then the decode tokens.
CPU (and CUDA prefill): torch SDPA. CUDA decode: the Triton kernel in `triton_attention` (imported
lazily, only for CUDA tensors), falling back to the torch path when Triton is unavailable.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

log = logging.getLogger("switchyard.engine.attention")


@dataclass
class AttentionMetadata:
    """Where each token's KV goes and what each segment attends to.

    Flat batch layout: the prefill segments first (one per sequence, in order), then the decode
    tokens (one per sequence). Block ids are read through `block_table` (a persistent
    `[rows, max_blocks]` int32 table, see step_inputs.BlockTable) at each segment's row, so the
    metadata of a step is O(batch) whatever the context length.
    """
    slot_mapping: torch.Tensor            # [T] int64, KV slot of each token (-1: padding, not written)
    prefill_query_lens: list[int]         # host
    prefill_context_lens: list[int]       # host: KV length after this step incl. this chunk (cached prefix + chunk)
    num_decode_tokens: int
    decode_context_lens: torch.Tensor | None   # [D] int32, KV length incl. the new token
    max_decode_context_len: int
    block_table: torch.Tensor | None = None    # [rows, max_blocks] int32, persistent
    prefill_rows: list[int] | None = None      # host rows of the prefill segments
    prefill_rows_t: torch.Tensor | None = None            # [P] int32 (device)
    prefill_query_start_loc: torch.Tensor | None = None   # [P+1] int32 (device)
    prefill_seq_lens: torch.Tensor | None = None          # [P] int32 (device), = prefill_context_lens
    max_prefill_query_len: int = 0
    decode_rows: torch.Tensor | None = None    # [D] int32 (device) rows of the decode segments
    # [D, W] int32: the decode rows' first W = ceil(max_decode_context_len / block_size) columns; the
    # CPU step fills it on the host, the CUDA torch fallback gathers it on the device when first asked.
    decode_block_tables: torch.Tensor | None = None
    # Per-step values every layer would otherwise recompute (the gather indices and mask of the
    # decode attention, whether any slot is padding), filled by the first layer that needs them.
    step_cache: dict = field(default_factory=dict)

    def prefill_block_table(self, i: int) -> torch.Tensor:
        """Segment i's block ids (a view of its row, as many columns as its context needs)."""
        return self.block_table[self.prefill_rows[i]]

    @property
    def prefill_block_tables(self) -> list[torch.Tensor]:
        return [self.prefill_block_table(i) for i in range(len(self.prefill_query_lens))]

    def decode_tables(self, block_size: int) -> torch.Tensor:
        """[D, W] block ids of the decode rows (W: just enough columns for the longest context)."""
        if self.decode_block_tables is None:
            W = max(1, -(-self.max_decode_context_len // block_size))
            self.decode_block_tables = self.block_table[:, :W].index_select(0, self.decode_rows.long())
        return self.decode_block_tables


def build_attention_metadata(prefills: list[tuple[int, int, list[int]]], decodes: list[tuple[int, list[int]]],
                             block_size: int, device, max_blocks_per_seq: int | None = None) -> AttentionMetadata:
    """Metadata from plain lists (tests and tools; the engine uses step_inputs.StepInputs).

    prefills: (query_len, context_len, block_table); decodes: (context_len, block_table). Token i of
    a prefill chunk sits at position context_len - query_len + i; a decode token at context_len - 1.
    slot = block_table[pos // block_size] * block_size + pos % block_size.
    """
    tables = [bt for _, _, bt in prefills] + [bt for _, bt in decodes]
    for ql, cl, bt in prefills:
        if ql <= 0 or cl < ql:
            raise ValueError(f"bad prefill segment: query_len={ql} context_len={cl}")
        if len(bt) * block_size < cl:
            raise ValueError(f"block table of {len(bt)} blocks too short for context {cl}")
    for cl, _ in decodes:
        if cl <= 0:
            raise ValueError(f"bad decode context_len={cl}")
    width = max([len(bt) for bt in tables] + [1])
    if max_blocks_per_seq is not None:
        if width > max_blocks_per_seq:
            raise ValueError(f"a block table exceeds max_blocks_per_seq={max_blocks_per_seq}")
    table = torch.zeros((max(len(tables), 1), width), dtype=torch.int32)
    for r, bt in enumerate(tables):
        table[r, :len(bt)] = torch.tensor(bt, dtype=torch.int32)
    slots, ctx = [], []
    for r, (ql, cl, bt) in enumerate(prefills):
        pos = torch.arange(cl - ql, cl, dtype=torch.int64)
        slots.append(table[r].long()[pos // block_size] * block_size + pos % block_size)
        ctx.append(cl)
    for cl, bt in decodes:
        pos = cl - 1
        slots.append(torch.tensor([bt[pos // block_size] * block_size + pos % block_size], dtype=torch.int64))
        ctx.append(cl)
    P, D = len(prefills), len(decodes)
    qlens = [ql for ql, _, _ in prefills]
    qsl = torch.zeros(P + 1, dtype=torch.int32)
    if P:
        qsl[1:] = torch.tensor(qlens, dtype=torch.int32).cumsum(0)
    ctx_t = torch.tensor(ctx, dtype=torch.int32)
    rows_t = torch.arange(P + D, dtype=torch.int32)
    max_dec = max(ctx[P:], default=0)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots).to(device) if slots else torch.empty(0, dtype=torch.int64, device=device),
        prefill_query_lens=qlens, prefill_context_lens=ctx[:P], num_decode_tokens=D,
        decode_context_lens=ctx_t[P:].to(device) if D else None, max_decode_context_len=max_dec,
        block_table=table.to(device), prefill_rows=list(range(P)), prefill_rows_t=rows_t[:P].to(device),
        prefill_query_start_loc=qsl.to(device), prefill_seq_lens=ctx_t[:P].to(device),
        max_prefill_query_len=max(qlens, default=0), decode_rows=rows_t[P:].to(device) if D else None)
    if D:
        meta.decode_tables(block_size)
    return meta


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
            except (ImportError, RuntimeError) as e:  # pragma: no cover - no usable triton on this machine
                log.debug("triton attention unavailable: %r", e)
                _triton_mod = None
    return _triton_mod


_prefill_mod = None
_prefill_checked = False


def _triton_prefill():
    """The triton_prefill module (varlen paged prefill kernel), or None - as _triton()."""
    global _prefill_mod, _prefill_checked
    if not _prefill_checked:
        _prefill_checked = True
        if _triton() is not None:
            try:
                from workers.engine import triton_prefill
                if triton_prefill.available():
                    _prefill_mod = triton_prefill
            except ImportError:  # pragma: no cover - kernel module missing
                _prefill_mod = None
    return _prefill_mod


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
    return cache[block_table[:nblk].long()].flatten(0, 1)[:context_len]


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
    tables = meta.decode_tables(k_cache.shape[1])
    if native and qd.dtype == torch.float32 and k_cache.dtype == torch.float32:
        return torch.ops.switchyard.paged_decode_attention(qd, k_cache, v_cache, tables,
                                                           meta.decode_context_lens, scale)
    return decode_attention_torch(qd, k_cache, v_cache, tables, meta.decode_context_lens,
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
    pre = _triton_prefill() if (q.is_cuda and n_prefill) else None
    if pre is not None:
        # One varlen launch for every prefill chunk, keys read from the cache (written above).
        pre.paged_prefill_attention(q[:n_prefill], k_cache, v_cache, meta.block_table, meta.prefill_rows_t,
                                    meta.prefill_query_start_loc, meta.prefill_seq_lens,
                                    meta.max_prefill_query_len, scale, out=out[:n_prefill])
        off = n_prefill
    else:
        off = 0
        for i, (ql, cl) in enumerate(zip(meta.prefill_query_lens, meta.prefill_context_lens)):
            out[off:off + ql] = prefill_attention(q[off:off + ql], k[off:off + ql], v[off:off + ql], k_cache,
                                                  v_cache, ql, cl, meta.prefill_block_table(i), scale)
            off += ql
    if n_dec:
        qd = q[off:off + n_dec]
        tri = _triton() if q.is_cuda else None
        if tri is not None:
            tri.paged_decode_attention(qd, k_cache, v_cache, meta.block_table, meta.decode_context_lens,
                                       scale, out=out[off:off + n_dec], seq_rows=meta.decode_rows)
        else:
            out[off:off + n_dec] = _decode(qd, k_cache, v_cache, meta, scale, native)
    return out
