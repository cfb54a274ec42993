"""Triton kernels for the CUDA path: paged decode attention and the KV-cache write.

Both read everything (block tables, context lengths, slots) from device memory and launch fixed
grids, so they can be captured in CUDA graphs. Imported lazily by `attention.py` only for CUDA
tensors. With TRITON_INTERPRET=1 set before the first call, the kernels also run on CPU tensors
(that is how the tests check them on machines without a GPU). TRITON_INTERPRET must be set
before this module is first imported: the kernels are defined at import.

Decode kernel: one program per (sequence, kv head). It loads the GQA group's query heads as one
[BLOCK_H, D] tile (padded to >= 16 rows for tl.dot), walks the context in BLOCK_N-token tiles
(token -> block id through the block table), and keeps an online softmax in float32.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    _HAVE_TRITON = True
except (ImportError, RuntimeError):  # pragma: no cover - triton not installed, or unusable here
    triton = None
    tl = None
    _HAVE_TRITON = False


def available() -> bool:
    return _HAVE_TRITON


if _HAVE_TRITON:
    @triton.jit
    def _decode_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, lens_ptr, rows_ptr,
        scale,
        stride_qb, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_ob, stride_oh,
        stride_btb,
        GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, HAS_ROWS: tl.constexpr,
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        ctx_len = tl.load(lens_ptr + b)
        # The sequence's row in the (persistent) block table: rows_ptr[b], or b for a per-step table.
        if HAS_ROWS:
            row = tl.load(rows_ptr + b).to(tl.int64)
        else:
            row = b.to(tl.int64)

        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        h_mask = offs_h < GROUP
        d_mask = offs_d < HEAD_DIM
        heads = kvh * GROUP + offs_h

        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=h_mask[:, None] & d_mask[None, :], other=0.0)

        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)

        for start in range(0, ctx_len, BLOCK_N):
            tok = start + offs_n
            n_mask = tok < ctx_len
            blk = tl.load(bt_ptr + row * stride_btb + tok // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
            slot_in_blk = (tok % BLOCK_SIZE).to(tl.int64)
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_ptr + blk[:, None] * stride_kb + slot_in_blk[:, None] * stride_ks + kvh * stride_kh
                        + offs_d[None, :], mask=kv_mask, other=0.0)
            if DOT_F32:
                s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * scale
            s = tl.where(n_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + blk[:, None] * stride_vb + slot_in_blk[:, None] * stride_vs + kvh * stride_vh
                        + offs_d[None, :], mask=kv_mask, other=0.0)
            if DOT_F32:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        l_i = tl.where(l_i == 0.0, 1.0, l_i)          # padding rows (context 0): output zeros, not NaN
        out = acc / l_i[:, None]
        tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=h_mask[:, None] & d_mask[None, :])

    @triton.jit
    def _store_kv_kernel(
        k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
        stride_kt, stride_kh, stride_vt, stride_vh,
        stride_cslot, stride_ch,
        NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        t = tl.program_id(0)
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        slot = tl.load(slot_ptr + t + offs_h * 0).to(tl.int64)      # the token's slot, once per head row
        mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM) & (slot[:, None] >= 0)
        k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
        v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
        dst = slot[:, None] * stride_cslot + offs_h[:, None] * stride_ch + offs_d[None, :]
        tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)



def _kernels():
    if not _HAVE_TRITON:
        raise RuntimeError("triton is not installed")
    return _decode_kernel, _store_kv_kernel


def next_pow2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1): Triton block sizes."""
    return 1 << (max(int(x), 1) - 1).bit_length()


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           out: torch.Tensor | None = None, block_n: int = 32,
                           seq_rows: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, D]; caches [num_blocks, block_size, KVH, D]; context_lens [B] -> [B, H, D].
    block_tables: [B, max_blocks], or with `seq_rows` [B] a persistent [rows, max_blocks] table read at
    row seq_rows[b]. Only the columns a sequence's context needs are read. Rows with context_len 0
    give zeros."""
    decode_kernel, _ = _kernels()
    B, H, D = q.shape
    _, block_size, KVH, Dk = k_cache.shape
    assert Dk == D and H % KVH == 0, (q.shape, k_cache.shape)
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1 and q.stride(2) == 1
    group = H // KVH
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(2) == 1
    if B == 0:
        return out
    q = q.to(k_cache.dtype)
    # float32 caches: exact (ieee) fp32 dots, not tf32. The interpreter (TRITON_INTERPRET=1) computes bf16
    # tl.dot wrongly (triton 3.9), so there bf16 operands are upcast too.
    dot_f32 = k_cache.dtype == torch.float32 or (
        k_cache.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))
    BLOCK_H = max(16, next_pow2(group))
    BLOCK_D = max(16, next_pow2(D))
    decode_kernel[(B, KVH)](
        q, k_cache, v_cache, out, block_tables, context_lens,
        seq_rows if seq_rows is not None else context_lens,
        float(scale),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=group, BLOCK_H=BLOCK_H, HEAD_DIM=D, BLOCK_D=BLOCK_D,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, DOT_F32=dot_f32, HAS_ROWS=seq_rows is not None,
    )
    return out


def store_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """k, v [T, KVH, D] -> caches at flat slots (slot < 0 skipped)."""
    _, store_kernel = _kernels()
    T, KVH, D = k.shape
    if T == 0:
        return
    assert k.stride(2) == 1 and v.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    store_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        KVH * D, D,
        NUM_KV_HEADS=KVH, HEAD_DIM=D, BLOCK_H=next_pow2(KVH), BLOCK_D=next_pow2(D),
    )
