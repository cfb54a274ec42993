"""Segmented batched LoRA (Punica SGMV / S-LoRA style) in Triton: one shrink and one expand launch per
projection for every adapter in the batch. Used by `lora.LoraBatch` in mode "triton".

Inputs are `lora.py`'s slot stacks as they are: A `[slots, in, n_sub * r_max]` (the sub-projections'
A matrices side by side, each zero-padded to r_max columns) and, per sub-projection j, B_j
`[slots, r_max, out_j]` (scaling folded in, rows beyond the adapter's rank zero). The output of a
fused projection is the sub-projections' outputs side by side: out `[T, sum(out_j)]`.

The work list is a tile table on the device, int32 `[n_tiles, 5]` = (first row, end row, slot, rank,
sub mask): the runner orders rows by slot, so each adapter's rows are one or two contiguous
segments; each segment is cut into row tiles of BLOCK_M rows (a decode is a 1-row tile, a prefill
many full ones). Rows of slot 0 (no adapter) are in no tile: neither kernel touches them. The grid
size is the table's length, known on the host when the table is built, so nothing reads device
values back (no host sync).

* shrink: grid (row tile, column tile of n_sub * r_max, K split). Each program accumulates
  x[rows, k-range] @ A[slot][k-range, cols] in float32 and writes its partial sum to
  `partial[split, rows, cols]`. Splitting K gives a decode batch (a few 1-row tiles) enough programs
  to stream the A slices at full bandwidth; the expand sums the partials, so no atomics and the
  result is deterministic.
* expand: grid (row tile, output column tile). Each program sums the partials of its rows, and for
  each sub-projection its column tile overlaps (and the adapter targets) adds
  shrunk[:, j*r_max : j*r_max + rank] @ B_j[slot][:rank, cols] to out in place (one read-modify-write
  of each output element, by exactly one program).

Columns beyond the adapter's rank and sub-projections it does not target are masked off in both
kernels: they are zero in the stacks, masking only saves their reads.

With TRITON_INTERPRET=1 set before this module is first imported, the kernels run on CPU tensors
(tests/test_triton_lora.py); the interpreter computes bf16 `tl.dot` wrongly (triton 3.9), so there
the operands are upcast to float32.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch

from workers.engine.triton_attention import next_pow2

try:
    import triton
    import triton.language as tl
    _HAVE_TRITON = True
except (ImportError, RuntimeError):  # pragma: no cover - triton not installed, or unusable here
    triton = None
    tl = None
    _HAVE_TRITON = False

TILE_COLS = 5            # (first row, end row, slot, rank, sub mask) per row tile
SHRINK_BLOCK_K = 64
EXPAND_BLOCK_N = 128
# Enough shrink programs to keep a GPU's SMs streaming A in a decode step (132 SMs on an H200).
SHRINK_TARGET_PROGRAMS = 256


def available() -> bool:
    return _HAVE_TRITON


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if _HAVE_TRITON:
    @triton.jit
    def _tile_entry(tab_ptr, tile):
        """One row of the tile table: first row, end row, slot, rank, bitmask of targeted sub-projections."""
        base = tab_ptr + tile * 5
        return (tl.load(base), tl.load(base + 1), tl.load(base + 2).to(tl.int64), tl.load(base + 3),
                tl.load(base + 4))

    @triton.jit
    def _shrink_kernel(
        x_ptr, a_ptr, p_ptr, tab_ptr,
        K, k_per_split,
        stride_xm, stride_as, stride_ak, stride_ps, stride_pm,
        R: tl.constexpr, NR: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        tile = tl.program_id(0)
        pid_n = tl.program_id(1)
        split = tl.program_id(2)
        row0, row1, slot, rank, subs = _tile_entry(tab_ptr, tile)

        offs_m = row0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < row1
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        in_cols = offs_n < NR
        # column j*R + c belongs to sub-projection j, rank index c: read only c < rank of targeted subs
        n_mask = in_cols & ((offs_n % R) < rank) & (((subs >> (offs_n // R)) & 1) != 0)

        k0 = split * k_per_split
        k1 = tl.minimum(k0 + k_per_split, K)
        a_base = a_ptr + slot * stride_as
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k0, k1, BLOCK_K):
            offs_k = k + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k1
            xt = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            at = tl.load(a_base + offs_k.to(tl.int64)[:, None] * stride_ak + offs_n[None, :],
                         mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if DOT_F32:
                acc += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(xt, at)
        dst = p_ptr + split * stride_ps + offs_m.to(tl.int64)[:, None] * stride_pm + offs_n[None, :]
        tl.store(dst, acc, mask=m_mask[:, None] & in_cols[None, :])

    @triton.jit
    def _expand_sub(acc, p_ptr, b_ptr, offs_m, m_mask, cols, c_first, slot, rank, subs, col0, width,
                    n_splits, stride_ps, stride_pm,
                    J: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_R: tl.constexpr, DOT_F32: tl.constexpr):
        """acc += shrunk[:, J*R : J*R + rank] @ B_J[slot][:rank, cols - col0], where cols overlap sub J."""
        hit = (((subs >> J) & 1) != 0) & (c_first < col0 + width) & (c_first + BLOCK_N > col0)
        if hit:
            offs_r = tl.arange(0, BLOCK_R)
            r_mask = offs_r < rank
            s_mask = m_mask[:, None] & r_mask[None, :]
            s_ptrs = p_ptr + offs_m.to(tl.int64)[:, None] * stride_pm + J * R + offs_r[None, :]
            s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for sp in range(0, n_splits):          # the shrink's split-K partial sums
                s += tl.load(s_ptrs + sp * stride_ps, mask=s_mask, other=0.0)
            c = cols - col0
            c_mask = (c >= 0) & (c < width)
            b = tl.load(b_ptr + slot * (R * width) + offs_r[:, None] * width + c[None, :],
                        mask=r_mask[:, None] & c_mask[None, :], other=0.0)
            if DOT_F32:
                acc += tl.dot(s, b.to(tl.float32), input_precision="ieee")
            else:
                # round the shrunk rows to the weights' dtype, as the torch paths' matmul pair does
                acc += tl.dot(s.to(b.dtype), b)
        return acc

    @triton.jit
    def _expand_kernel(
        p_ptr, b0_ptr, b1_ptr, b2_ptr, out_ptr, tab_ptr,
        n0, n1, n2, n_splits,
        stride_ps, stride_pm, stride_om,
        R: tl.constexpr, NSUB: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        tile = tl.program_id(0)
        pid_n = tl.program_id(1)
        row0, row1, slot, rank, subs = _tile_entry(tab_ptr, tile)

        offs_m = row0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < row1
        c_first = pid_n * BLOCK_N
        cols = c_first + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = _expand_sub(acc, p_ptr, b0_ptr, offs_m, m_mask, cols, c_first, slot, rank, subs, 0, n0,
                          n_splits, stride_ps, stride_pm, 0, R, BLOCK_M, BLOCK_N, BLOCK_R, DOT_F32)
        if NSUB > 1:
            acc = _expand_sub(acc, p_ptr, b1_ptr, offs_m, m_mask, cols, c_first, slot, rank, subs, n0, n1,
                              n_splits, stride_ps, stride_pm, 1, R, BLOCK_M, BLOCK_N, BLOCK_R, DOT_F32)
        if NSUB > 2:
            acc = _expand_sub(acc, p_ptr, b2_ptr, offs_m, m_mask, cols, c_first, slot, rank, subs, n0 + n1, n2,
                              n_splits, stride_ps, stride_pm, 2, R, BLOCK_M, BLOCK_N, BLOCK_R, DOT_F32)
        o_mask = m_mask[:, None] & (cols < n0 + n1 + n2)[None, :]
        o_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + cols[None, :]
        o = tl.load(o_ptrs, mask=o_mask, other=0.0)
        tl.store(o_ptrs, (o.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=o_mask)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pick_block_m(max_segment_rows: int) -> int:
    """Row tile height: 16 (the tl.dot minimum) for decodes and short segments, 64 for long prefill
    segments (each tile re-reads its slot's A and B, so taller tiles read them fewer times)."""
    return 64 if max_segment_rows >= 128 else 16


def tile_rows(segments: Iterable[tuple[int, int, int, int, int]], block_m: int) -> list[int]:
    """segments: (first row, end row, slot, rank, sub mask) -> the flat tile table (TILE_COLS ints a tile).
    Slot-0 segments are dropped: those rows get no delta."""
    flat: list[int] = []
    for s, e, slot, rank, mask in segments:
        if slot == 0 or mask == 0:
            continue
        for r0 in range(s, e, block_m):
            flat += (r0, min(r0 + block_m, e), slot, rank, mask)
    return flat


def shrink_blocks(n_cols: int) -> int:
    """Shrink column tile: the whole n_sub * r_max when it fits in 64 columns, else 64-column tiles."""
    return max(16, min(64, next_pow2(n_cols)))


def pick_split_k(n_tiles: int, n_cols: int, k: int, target: int = SHRINK_TARGET_PROGRAMS) -> int:
    """Split-K factor for the shrink: 1 when there are enough row tiles (prefill), else enough splits
    to reach `target` programs, keeping >= 4 BLOCK_K steps per program."""
    progs = max(1, n_tiles) * _cdiv(n_cols, shrink_blocks(n_cols))
    if progs >= target:
        return 1
    return max(1, min(_cdiv(target, progs), k // (4 * SHRINK_BLOCK_K)))


def _k_per_split(k: int, split_k: int) -> tuple[int, int]:
    """(K elements per split rounded up to BLOCK_K, the number of non-empty splits)."""
    per = _cdiv(_cdiv(k, max(1, split_k)), SHRINK_BLOCK_K) * SHRINK_BLOCK_K
    return per, _cdiv(k, per)


def effective_split_k(k: int, split_k: int) -> int:
    """The number of partial sums the shrink writes for `split_k` requested over K = k."""
    return _k_per_split(k, split_k)[1]


def _dot_f32(dtype: torch.dtype) -> bool:
    # float32: exact (ieee) fp32 dots, not tf32; under the interpreter every dot is upcast (bf16 is wrong there)
    return dtype == torch.float32 or interpreting()


def sgmv_shrink(x: torch.Tensor, a_stack: torch.Tensor, tiles: torch.Tensor, partial: torch.Tensor,
                *, r_max: int, block_m: int, split_k: int = 1) -> int:
    """partial[split, rows, :] = x[rows, k-range] @ a_stack[slot][k-range, :] for every tile (float32).

    x [T, in]; a_stack [slots, in, n_sub * r_max]; tiles int32 [n, TILE_COLS] on x's device;
    partial float32 [>= splits, T, n_sub * r_max]. Rows in no tile are left as they are.
    Returns the number of splits written (what `sgmv_expand` must sum)."""
    if not _HAVE_TRITON:
        raise RuntimeError("triton is not installed")
    n_tiles = tiles.shape[0]
    S, K, NR = a_stack.shape
    per, splits = _k_per_split(K, split_k)
    assert x.shape[1] == K and x.stride(1) == 1 and a_stack.stride(2) == 1, (x.shape, a_stack.shape)
    assert partial.dtype == torch.float32 and partial.shape[0] >= splits and partial.shape[2] == NR
    assert partial.stride(2) == 1 and tiles.is_contiguous() and NR % r_max == 0
    if n_tiles == 0:
        return splits
    bn = shrink_blocks(NR)
    _shrink_kernel[(n_tiles, _cdiv(NR, bn), splits)](
        x, a_stack, partial, tiles,
        K, per,
        x.stride(0), a_stack.stride(0), a_stack.stride(1), partial.stride(0), partial.stride(1),
        R=r_max, NR=NR, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=SHRINK_BLOCK_K, DOT_F32=_dot_f32(x.dtype),
    )
    return splits


def sgmv_expand(partial: torch.Tensor, b_stacks: Sequence[torch.Tensor], out: torch.Tensor, tiles: torch.Tensor,
                *, r_max: int, block_m: int, splits: int = 1) -> None:
    """out[rows, cols of sub j] += (sum of partial[:splits, rows, j*r_max : j*r_max + rank]) @ B_j[slot][:rank]
    for every tile, in place.

    b_stacks: per sub-projection (1 to 3) [slots, r_max, out_j], contiguous; out [T, sum(out_j)] with
    unit column stride (the fused projection's output)."""
    if not _HAVE_TRITON:
        raise RuntimeError("triton is not installed")
    n_tiles = tiles.shape[0]
    nsub = len(b_stacks)
    assert 1 <= nsub <= 3, nsub
    widths = [b.shape[2] for b in b_stacks]
    assert all(b.is_contiguous() and b.shape[1] == r_max for b in b_stacks)
    assert out.shape[1] == sum(widths) and out.stride(1) == 1, (out.shape, widths)
    assert partial.dtype == torch.float32 and partial.shape[0] >= splits and partial.stride(2) == 1
    if n_tiles == 0:
        return
    n = widths + [0] * (3 - nsub)
    bs = list(b_stacks) + [b_stacks[0]] * (3 - nsub)      # unused pointers: never read (NSUB is constexpr)
    _expand_kernel[(n_tiles, _cdiv(out.shape[1], EXPAND_BLOCK_N))](
        partial, bs[0], bs[1], bs[2], out, tiles,
        n[0], n[1], n[2], splits,
        partial.stride(0), partial.stride(1), out.stride(0),
        R=r_max, NSUB=nsub, BLOCK_M=block_m, BLOCK_N=EXPAND_BLOCK_N, BLOCK_R=max(16, next_pow2(r_max)),
        DOT_F32=_dot_f32(b_stacks[0].dtype),
    )


def sgmv(x: torch.Tensor, a_stack: torch.Tensor, b_stacks: Sequence[torch.Tensor], out: torch.Tensor,
         tiles: torch.Tensor, *, r_max: int, block_m: int, split_k: int = 1,
         partial: torch.Tensor | None = None) -> None:
    """Shrink then expand: out[t] += sum_j B_j[slot_t] @ (A[slot_t] @ x[t]) for the rows in `tiles`."""
    if partial is None:
        partial = torch.empty((effective_split_k(a_stack.shape[1], split_k), x.shape[0], a_stack.shape[2]),
                              dtype=torch.float32, device=x.device)
    splits = sgmv_shrink(x, a_stack, tiles, partial, r_max=r_max, block_m=block_m, split_k=split_k)
    sgmv_expand(partial, b_stacks, out, tiles, r_max=r_max, block_m=block_m, splits=splits)
