"""Variable-length paged prefill attention for CUDA: every prefill chunk of a step in one Triton launch.

All prefill segments of a step are concatenated in q [Tq, H, D]; segment i is
q[query_start_loc[i]:query_start_loc[i+1]]. Keys and values are read only from the paged KV cache
(`write_kv` has already stored the chunk's own k/v there), through row seq_rows[i] of the
persistent block table. Query j of segment i sits at position seq_lens[i] - qlen_i + j and attends
to key positions 0..that position (the cached prefix plus causal inside the chunk).

Kernel (FlashAttention-2 style): grid (segment, query tile, kv head). A program packs the GQA
group's query heads with TOKENS consecutive query tokens into one [BLOCK_M, D] tile (row r = token
r // GROUP, head r % GROUP), so each K/V tile loaded from the cache serves all GROUP heads that
share it (GROUP times fewer cache reads than one program per query head, same number of programs).
It walks the keys in BLOCK_N-token tiles (token -> block id through the block table) with an
online softmax in float32 (exp2, scale folded in), in two loops: key tiles every row of the query
tile may see entirely (no mask at all), then the tiles across the causal diagonal, stopping at the
last key the tile's last query may see, so no chunk reads keys past its causal limit.

Everything per-sequence is read from device memory; `max_query_len` (host) only sizes the grid, so
the launch needs no device->host sync. As with `triton_attention`, TRITON_INTERPRET=1 must be set
before this module is imported for the kernel to run on CPU tensors (the interpreter).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from workers.engine.triton_attention import next_pow2

try:
    import triton
    import triton.language as tl
    _HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton not installed
    triton = None
    tl = None
    _HAVE_TRITON = False

# Whether the kernel below is an interpreted one: triton decides at decoration (import) time, so the
# environment at import is what counts, not at call time.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_LOG2E = 1.4426950408889634


def available() -> bool:
    return _HAVE_TRITON


if _HAVE_TRITON:
    @triton.jit
    def _attend_tile(q, m_i, l_i, acc, start, hi, row_pos, k_ptr, v_ptr, bt_row, kvh,
                     stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                     qk_scale, offs_n, d_mask, offs_d,
                     BLOCK_SIZE: tl.constexpr, DOT_F32: tl.constexpr, MASKED: tl.constexpr):
        """One key tile of the online softmax (keys start..start+BLOCK_N through the block table).
        MASKED: the tile crosses the causal diagonal or the chunk's last key, so keys are masked per row."""
        tok = start + offs_n
        if MASKED:
            n_mask = tok < hi                       # never past the causal limit (nor the block table's end)
            blk = tl.load(bt_row + tok // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
            kv_mask = n_mask[:, None] & d_mask[None, :]
        else:
            blk = tl.load(bt_row + tok // BLOCK_SIZE).to(tl.int64)
            kv_mask = d_mask[None, :]
        slot = (tok % BLOCK_SIZE).to(tl.int64)
        k = tl.load(k_ptr + blk[:, None] * stride_kb + slot[:, None] * stride_ks + kvh * stride_kh
                    + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + blk[:, None] * stride_vb + slot[:, None] * stride_vs + kvh * stride_vh
                    + offs_d[None, :], mask=kv_mask, other=0.0)
        if DOT_F32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale
        if MASKED:
            s = tl.where((tok[None, :] <= row_pos[:, None]) & n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DOT_F32:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc * alpha[:, None] + pv

    @triton.jit
    def _prefill_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, rows_ptr, qsl_ptr, lens_ptr,
        qk_scale,                                   # softmax scale * log2(e): the softmax runs in exp2
        stride_qt, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_ot, stride_oh,
        stride_btb,
        GROUP: tl.constexpr, TOKENS: tl.constexpr, BLOCK_M: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        seg = tl.program_id(0)
        tile = tl.program_id(1)
        kvh = tl.program_id(2)

        q_start = tl.load(qsl_ptr + seg)
        q_len = tl.load(qsl_ptr + seg + 1) - q_start
        tile_tok0 = tile * TOKENS
        if tile_tok0 >= q_len:                      # the grid is sized for the longest segment
            return
        seq_len = tl.load(lens_ptr + seg)
        prefix = seq_len - q_len                    # cached tokens before this chunk
        bt_row = bt_ptr + tl.load(rows_ptr + seg).to(tl.int64) * stride_btb

        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        d_mask = offs_d < HEAD_DIM
        row_tok = tile_tok0 + offs_m // GROUP       # token index inside the segment
        row_head = kvh * GROUP + offs_m % GROUP
        # Rows past TOKENS * GROUP (BLOCK_M not a multiple of GROUP) and tokens past the chunk are padding.
        row_valid = (offs_m < TOKENS * GROUP) & (row_tok < q_len)
        row_pos = prefix + row_tok                  # absolute position: sees keys 0..row_pos

        q_off = (q_start + row_tok).to(tl.int64)[:, None] * stride_qt + row_head[:, None] * stride_qh + offs_d[None, :]
        q = tl.load(q_ptr + q_off, mask=row_valid[:, None] & d_mask[None, :], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        last_tok = tl.minimum(tile_tok0 + TOKENS, q_len) - 1
        hi = prefix + last_tok + 1                  # keys [0, hi): the most the tile's last query sees
        # Keys [0, lo) are visible to every row (lo <= first row's position + 1 <= hi): full tiles, no mask.
        lo = ((prefix + tile_tok0 + 1) // BLOCK_N) * BLOCK_N

        for start in range(0, lo, BLOCK_N):
            m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, start, hi, row_pos, k_ptr, v_ptr, bt_row, kvh,
                                         stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                                         qk_scale, offs_n, d_mask, offs_d, BLOCK_SIZE, DOT_F32, False)

        # Tiles across the diagonal. No row is left with only masked keys and m_i == -inf (which would
        # make alpha NaN): if lo == 0 every row sees key 0 in the first tile, else loop 1 ran.
        for start in range(lo, hi, BLOCK_N):
            m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, start, hi, row_pos, k_ptr, v_ptr, bt_row, kvh,
                                         stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                                         qk_scale, offs_n, d_mask, offs_d, BLOCK_SIZE, DOT_F32, True)

        out = acc / l_i[:, None]
        o_off = (q_start + row_tok).to(tl.int64)[:, None] * stride_ot + row_head[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=row_valid[:, None] & d_mask[None, :])


def _check_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor | None) -> None:
    _, H, D = q.shape
    _, _, KVH, Dk = k_cache.shape
    assert Dk == D and H % KVH == 0, (q.shape, k_cache.shape)
    assert v_cache.shape == k_cache.shape, (k_cache.shape, v_cache.shape)
    if out is not None:
        assert out.shape == q.shape and out.dtype == q.dtype, (out.shape, out.dtype, q.shape, q.dtype)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_table: torch.Tensor, seq_rows: torch.Tensor, query_start_loc: torch.Tensor,
                            seq_lens: torch.Tensor, max_query_len: int, scale: float,
                            out: torch.Tensor | None = None, *, block_m: int | None = None,
                            block_n: int | None = None) -> torch.Tensor:
    """Attention of all prefill segments in one launch. q [Tq, H, D]; caches [num_blocks, block_size, KVH, D];
    block_table int32 [max_num_seqs, max_blocks] (persistent, row seq_rows[i] for segment i); seq_rows int32 [P];
    query_start_loc int32 [P+1]; seq_lens int32 [P] (KV length including the chunk); max_query_len: host int,
    sizes the grid only. -> out [Tq, H, D] in q's dtype. block_m / block_n override the tile sizes (tests, tuning)."""
    if not _HAVE_TRITON:
        raise RuntimeError("triton is not installed")
    _check_args(q, k_cache, v_cache, out)
    Tq, H, D = q.shape
    _, block_size, KVH, _ = k_cache.shape
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and q.stride(2) == 1
    assert block_table.stride(1) == 1
    group = H // KVH
    if out is None:
        out = torch.empty_like(q)
    assert out.stride(2) == 1
    P = seq_rows.shape[0]
    if P == 0 or Tq == 0 or max_query_len <= 0:
        return out
    if q.dtype != k_cache.dtype:
        q = q.to(k_cache.dtype)
    # float32 caches: exact (ieee) fp32 dots, not tf32. The interpreter computes bf16 tl.dot wrongly
    # (triton 3.9, see triton_attention), so there bf16 operands are upcast too.
    dot_f32 = k_cache.dtype == torch.float32 or (k_cache.dtype == torch.bfloat16 and _INTERPRETED)
    if _INTERPRETED:                               # numpy per tile: small tiles keep CPU tests fast
        bm, bn = block_m or 16, block_n or 16
    else:
        bm, bn = block_m or 64, block_n or (64 if D <= 128 else 32)
    BLOCK_M = max(bm, 16, next_pow2(group))       # tl.dot wants >= 16 rows; at least one token per tile
    BLOCK_D = max(16, next_pow2(D))               # head dims like 48 or 80 are padded and masked
    while triton.cdiv(int(max_query_len), BLOCK_M // group) > 65535:   # CUDA's grid y limit (huge GQA groups)
        BLOCK_M *= 2
    tokens = BLOCK_M // group
    grid = (P, triton.cdiv(int(max_query_len), tokens), KVH)
    extra = {} if _INTERPRETED else {"num_warps": 4 if BLOCK_D <= 64 else 8, "num_stages": 2}
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_table, seq_rows, query_start_loc, seq_lens,
        float(scale) * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        block_table.stride(0),
        GROUP=group, TOKENS=tokens, BLOCK_M=BLOCK_M, HEAD_DIM=D, BLOCK_D=BLOCK_D,
        BLOCK_SIZE=block_size, BLOCK_N=max(bn, 16), DOT_F32=dot_f32,
        **extra,
    )
    return out


def paged_prefill_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_table: torch.Tensor, seq_rows: torch.Tensor, query_start_loc: torch.Tensor,
                                  seq_lens: torch.Tensor, max_query_len: int, scale: float,
                                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch reference / fallback (same arguments): one float32 SDPA per segment over its context
    gathered through the block table. Reads the lengths to the host (syncs): not for CUDA graphs."""
    _check_args(q, k_cache, v_cache, out)
    if out is None:
        out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    rows = seq_rows.tolist()
    block_size = k_cache.shape[1]
    for i, (row, seq_len) in enumerate(zip(rows, lens)):
        q0, q1 = starts[i], starts[i + 1]
        q_len = q1 - q0
        if q_len == 0:
            continue
        blocks = block_table[row, :math.ceil(seq_len / block_size)].long()   # never the garbage columns
        k = k_cache[blocks].flatten(0, 1)[:seq_len].float().transpose(0, 1)   # [KVH, C, D]
        v = v_cache[blocks].flatten(0, 1)[:seq_len].float().transpose(0, 1)
        qh = q[q0:q1].float().transpose(0, 1)                                  # [H, Q, D]
        qpos = torch.arange(q_len, device=q.device)[:, None] + (seq_len - q_len)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= qpos       # [Q, C]
        o = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[q0:q1] = o.transpose(0, 1).to(out.dtype)
    return out
