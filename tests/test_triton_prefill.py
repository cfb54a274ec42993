"""The variable-length paged prefill kernel (workers/engine/triton_prefill.py) in the Triton interpreter
on CPU, against its torch reference and, once, against dense attention over the unpaged tensors.

Every case builds a paged cache the way the engine holds it: a persistent block table whose rows are
not in segment order, shuffled non-contiguous block ids, and garbage past each row's used columns.
Everything the kernel must never read (unused blocks, the slots of a last block past the sequence's
length) is NaN, so a stray read shows up as a NaN in the output.
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed: the Triton prefill kernel is untested here", allow_module_level=True)

_MODULE_PATH = Path(__file__).resolve().parents[1] / "workers" / "engine" / "triton_prefill.py"


@pytest.fixture(scope="module")
def tp():
    """A private copy of triton_prefill whose kernel is interpreted. TRITON_INTERPRET is set only while
    this module's tests run: triton picks interpreter vs compiler when the kernel is decorated, and the
    setting must not leak into other tests (on a GPU machine it would make their kernels interpreted)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    name = "_triton_prefill_interpreted"
    spec = importlib.util.spec_from_file_location(name, _MODULE_PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod                      # triton looks up the kernel's module by name
    try:
        spec.loader.exec_module(mod)
        assert mod.available()
        yield mod
    finally:
        sys.modules.pop(name, None)
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


@dataclass
class Case:
    q: torch.Tensor                  # [Tq, H, D], all segments concatenated
    k_cache: torch.Tensor            # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor
    block_table: torch.Tensor        # int32 [max_num_seqs, max_blocks], persistent, garbage past used columns
    seq_rows: torch.Tensor           # int32 [P]
    query_start_loc: torch.Tensor    # int32 [P + 1]
    seq_lens: torch.Tensor           # int32 [P]
    max_query_len: int
    scale: float
    keys: list[torch.Tensor]         # per segment, the unpaged [seq_len, KVH, D] the cache was filled from
    values: list[torch.Tensor]

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.block_table, self.seq_rows, self.query_start_loc,
                self.seq_lens, self.max_query_len, self.scale)


def make_case(segments: list[tuple[int, int]], *, H: int, KVH: int, D: int, block_size: int,
              dtype: torch.dtype = torch.float32, seed: int = 0, max_num_seqs: int = 12,
              max_blocks: int = 16, extra_blocks: int = 9) -> Case:
    """segments: (cached prefix length, query length) per prefill chunk."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = [p + ql for p, ql in segments]
    need = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(need) + extra_blocks
    nan = float("nan")
    k_cache = torch.full((num_blocks, block_size, KVH, D), nan, dtype=dtype)
    v_cache = torch.full((num_blocks, block_size, KVH, D), nan, dtype=dtype)
    # Garbage everywhere first: any valid block id (often a NaN-poisoned one), so a read past the used
    # columns is a wrong (or NaN) value, not a crash.
    table = torch.randint(0, num_blocks, (max_num_seqs, max_blocks), generator=g, dtype=torch.int32)
    ids = torch.randperm(num_blocks, generator=g).tolist()          # shuffled, non-contiguous
    rows = torch.randperm(max_num_seqs, generator=g)[:len(segments)].tolist()   # table rows out of order
    keys, values = [], []
    for (prefix, ql), n, nb, row in zip(segments, seq_lens, need, rows):
        blocks, ids = ids[:nb], ids[nb:]
        table[row, :nb] = torch.tensor(blocks, dtype=torch.int32)
        k = torch.randn(n, KVH, D, generator=g).to(dtype)
        v = torch.randn(n, KVH, D, generator=g).to(dtype)
        for pos in range(n):                     # the prefix and the chunk itself (write_kv's job)
            k_cache[blocks[pos // block_size], pos % block_size] = k[pos]
            v_cache[blocks[pos // block_size], pos % block_size] = v[pos]
        keys.append(k)
        values.append(v)
    qlens = [ql for _, ql in segments]
    q = torch.randn(sum(qlens), H, D, generator=g).to(dtype)
    qsl = torch.tensor([0] + qlens, dtype=torch.int32).cumsum(0).to(torch.int32)
    return Case(q, k_cache, v_cache, table, torch.tensor(rows, dtype=torch.int32), qsl,
                torch.tensor(seq_lens, dtype=torch.int32), max(qlens, default=0), D ** -0.5, keys, values)


def dense_attention(case: Case) -> torch.Tensor:
    """float64 attention from the unpaged q/k/v alone (no cache, no block table): query j of a chunk
    of length Q over a context of length C sits at position C - Q + j and sees keys 0..that position."""
    outs = []
    starts = case.query_start_loc.tolist()
    for i, (k, v) in enumerate(zip(case.keys, case.values)):
        q = case.q[starts[i]:starts[i + 1]].double()
        rep = q.shape[1] // k.shape[1]
        k = k.double().repeat_interleave(rep, 1)
        v = v.double().repeat_interleave(rep, 1)
        s = torch.einsum("qhd,khd->hqk", q, k) * case.scale
        pos = torch.arange(q.shape[0])[:, None] + (k.shape[0] - q.shape[0])
        s = s.masked_fill(torch.arange(k.shape[0])[None, :] > pos, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), v))
    return torch.cat(outs)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def test_matches_dense_attention_without_block_table(tp):
    """Fresh prefills and chunks after a cached prefix of several blocks, GQA, float32: the kernel and the
    torch reference both equal attention computed from the original unpaged tensors."""
    case = make_case([(0, 17), (37, 5), (20, 40), (9, 1)], H=8, KVH=2, D=32, block_size=8)
    ref = dense_attention(case)
    out = tp.paged_prefill_attention(*case.args())
    assert out.dtype == torch.float32 and out.shape == case.q.shape
    assert max_err(out, ref) < 1e-5
    assert max_err(tp.paged_prefill_attention_torch(*case.args()), ref) < 1e-5


CASES = {
    # name: (segments as (prefix, query_len), H, KVH, D, block_size)
    "ragged_fresh_mha": ([(0, 1), (0, 5), (0, 17), (0, 40)], 4, 4, 32, 16),
    "prefix_hits_unaligned_gqa": ([(3, 5), (37, 17), (64, 40), (13, 1), (0, 2)], 8, 2, 48, 8),
    "group3_head_dim_80": ([(6, 11), (0, 23), (29, 7)], 6, 2, 80, 4),   # 16-row tile = 5 tokens x 3 heads + 1 pad row
    "block_larger_than_key_tile": ([(45, 20), (0, 33)], 4, 1, 16, 32),  # MQA, several key tiles per block
    # 5-token query tiles against 16-token key tiles: the first row of successive tiles falls at every
    # offset from a key tile's start, including right at the end of the unmasked key tiles.
    "diagonal_at_every_key_tile_offset": ([(7, 85)], 3, 1, 16, 8),
}
DTYPES = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
# Every shape in float32; half precision on two of them (enough, and keeps the interpreter run short).
PARAMS = [(name, torch.float32) for name in CASES] + [
    (name, dtype) for name in ("prefix_hits_unaligned_gqa", "group3_head_dim_80")
    for dtype in (torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("name,dtype", PARAMS, ids=[f"{n}-{str(d).split('.')[-1]}" for n, d in PARAMS])
def test_matches_torch_reference(tp, name, dtype):
    segments, H, KVH, D, bs = CASES[name]
    case = make_case(segments, H=H, KVH=KVH, D=D, block_size=bs, dtype=dtype, seed=len(name))
    out = tp.paged_prefill_attention(*case.args())
    ref = tp.paged_prefill_attention_torch(*case.args())
    assert out.dtype == dtype
    assert torch.isfinite(out).all(), "read a NaN-poisoned slot: past a causal limit or a table's used columns"
    assert max_err(out, ref) < DTYPES[dtype], max_err(out, ref)


def test_gpu_tile_sizes(tp):
    """The 64 x 64 tiles the kernel uses on a GPU (the interpreter defaults to 16 x 16)."""
    case = make_case([(70, 30), (0, 65), (129, 3)], H=8, KVH=2, D=48, block_size=16, seed=5)
    out = tp.paged_prefill_attention(*case.args(), block_m=64, block_n=64)
    assert max_err(out, tp.paged_prefill_attention_torch(*case.args())) < 1e-5


def test_writes_only_its_rows_of_out(tp):
    """`out` may be the prefill part of a step's whole output buffer; an oversized max_query_len only
    adds programs that return at once."""
    case = make_case([(10, 9), (0, 3)], H=4, KVH=2, D=16, block_size=4, seed=3)
    buf = torch.full((case.q.shape[0] + 4, 4, 16), 7.0)
    ret = tp.paged_prefill_attention(*case.args()[:7], case.max_query_len + 20, case.scale, out=buf[:case.q.shape[0]])
    assert ret.data_ptr() == buf.data_ptr()
    assert max_err(buf[:case.q.shape[0]], dense_attention(case)) < 1e-5
    assert (buf[case.q.shape[0]:] == 7.0).all()


def test_no_segments(tp):
    case = make_case([(0, 3)], H=2, KVH=1, D=16, block_size=4)
    empty_i32 = torch.zeros(0, dtype=torch.int32)
    q = case.q[:0]
    out = tp.paged_prefill_attention(q, case.k_cache, case.v_cache, case.block_table, empty_i32,
                                     torch.zeros(1, dtype=torch.int32), empty_i32, 0, case.scale)
    assert out.shape == (0, 2, 16)
