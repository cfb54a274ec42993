"""Paged attention (CPU SDPA path) against dense reference attention; the Triton decode kernel under
the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) against the SDPA path."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from workers.engine.attention import build_attention_metadata, paged_attention

H, KVH, D, BS = 6, 2, 16, 4


def _dense_attention(q, k, v, causal_offset):
    """q [Q, H, D], k/v [C, KVH, D]; query i sees keys 0..causal_offset+i."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, 1).float()
    v = v.repeat_interleave(rep, 1).float()
    s = torch.einsum("qhd,khd->hqk", q.float(), k) * D ** -0.5
    qi = torch.arange(q.shape[0])[:, None] + causal_offset
    s = s.masked_fill(torch.arange(k.shape[0])[None, :] > qi, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


def _caches(num_blocks=32, dtype=torch.float32):
    shape = (num_blocks, BS, KVH, D)
    return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)


def test_build_metadata_slots():
    meta = build_attention_metadata([(3, 7, [5, 2]), (2, 2, [9])], [(5, [1, 3]), (1, [4])], BS, "cpu",
                                    max_blocks_per_seq=4)
    # prefill 1: positions 4..6 -> block 2, offsets 0..2 ; prefill 2: block 9 offsets 0,1
    # decode 1: position 4 -> block 3 offset 0 ; decode 2: position 0 -> block 4 offset 0
    assert meta.slot_mapping.tolist() == [8, 9, 10, 36, 37, 12, 16]
    assert meta.slot_mapping.dtype == torch.int64
    assert meta.prefill_query_lens == [3, 2] and meta.prefill_context_lens == [7, 2]
    assert meta.num_decode_tokens == 2 and meta.max_decode_context_len == 5
    # Decode attention reads only the columns the longest decode context needs (5 tokens: 2 blocks),
    # never a table padded to max_blocks_per_seq.
    assert meta.decode_block_tables.shape == (2, 2)
    assert meta.decode_block_tables[0].tolist() == [1, 3] and meta.decode_block_tables[1, 0] == 4
    assert meta.decode_context_lens.tolist() == [5, 1] and meta.decode_context_lens.dtype == torch.int32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_matches_dense(dtype):
    """Mixed batch: fresh prefill, prefill with a cached prefix, and decodes (one padded with slot -1)."""
    g = torch.Generator().manual_seed(0)
    kc, vc = _caches(dtype=dtype)
    # sequences: A fresh prefill of 6; B has 5 cached + chunk of 4; C, D decode at context 9 and 3
    hist = {name: (torch.randn(n, KVH, D, generator=g).to(dtype), torch.randn(n, KVH, D, generator=g).to(dtype))
            for name, n in (("B", 5), ("C", 8), ("D", 2))}
    tables = {"A": [30, 3], "B": [7, 12, 1], "C": [20, 21, 22], "D": [4]}
    for name, (k, v) in hist.items():   # write history directly into the blocks
        for p in range(k.shape[0]):
            b, o = tables[name][p // BS], p % BS
            kc[b, o], vc[b, o] = k[p], v[p]
    T = 6 + 4 + 2 + 1                  # + one padded decode row
    q = torch.randn(T, H, D, generator=g).to(dtype)
    k = torch.randn(T, KVH, D, generator=g).to(dtype)
    v = torch.randn(T, KVH, D, generator=g).to(dtype)
    meta = build_attention_metadata([(6, 6, tables["A"]), (4, 9, tables["B"])],
                                    [(9, tables["C"]), (3, tables["D"]), (1, [31])], BS, "cpu",
                                    max_blocks_per_seq=4)
    meta.slot_mapping[-1] = -1          # padding row: not written
    meta.decode_context_lens[-1] = 0
    before = kc[31].clone()
    out = paged_attention(q, k, v, kc, vc, meta, D ** -0.5)
    assert torch.equal(kc[31], before)
    tol = 1e-5 if dtype == torch.float32 else 3e-2

    ref_a = _dense_attention(q[0:6], k[0:6], v[0:6], 0)
    kb = torch.cat([hist["B"][0], k[6:10]])
    vb = torch.cat([hist["B"][1], v[6:10]])
    ref_b = _dense_attention(q[6:10], kb, vb, 5)
    ref_c = _dense_attention(q[10:11], torch.cat([hist["C"][0], k[10:11]]), torch.cat([hist["C"][1], v[10:11]]), 8)
    ref_d = _dense_attention(q[11:12], torch.cat([hist["D"][0], k[11:12]]), torch.cat([hist["D"][1], v[11:12]]), 2)
    ref = torch.cat([ref_a, ref_b, ref_c, ref_d])
    assert (out[:12].float() - ref).abs().max().item() < tol
    assert torch.isfinite(out[12].float()).all()


_TRITON_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"          # before triton is imported
    import torch
    from workers.engine import triton_attention as ta
    from workers.engine.attention import decode_attention_torch, write_kv
    g = torch.Generator().manual_seed(0)
    worst = {}
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)):
        nb, bs, KVH, D, H = 40, 16, 3, 64, 9         # SmolLM2's GQA shape (3 query heads per kv head)
        kc = torch.randn(nb, bs, KVH, D, generator=g).to(dtype)
        vc = torch.randn(nb, bs, KVH, D, generator=g).to(dtype)
        lens = torch.tensor([1, 17, 100, 33, 128, 0], dtype=torch.int32)   # last row: padding
        bt = torch.stack([torch.randperm(nb, generator=g)[:8] for _ in range(6)]).to(torch.int32)
        q = torch.randn(6, H, D, generator=g).to(dtype)
        out = ta.paged_decode_attention(q, kc, vc, bt, lens, D ** -0.5)
        ref = decode_attention_torch(q, kc, vc, bt, lens, int(lens.max()), D ** -0.5)
        err = (out[:5].float() - ref[:5].float()).abs().max().item()
        assert err < tol, (dtype, err)
        assert out[5].abs().max().item() == 0.0
        worst[str(dtype)] = err
        # The engine's layout: a persistent table (more rows than the batch, garbage past each row's
        # context) read at each sequence's row. Same result, bit for bit.
        big = torch.randint(0, nb, (11, 64), generator=g).to(torch.int32)
        rows = torch.tensor([7, 2, 10, 0, 4, 5], dtype=torch.int32)
        big[rows.long(), :8] = bt
        out_rows = ta.paged_decode_attention(q, kc, vc, big, lens, D ** -0.5, seq_rows=rows)
        assert torch.equal(out_rows, out), dtype
        k = torch.randn(6, KVH, D, generator=g).to(dtype)
        v = torch.randn(6, KVH, D, generator=g).to(dtype)
        slots = torch.tensor([3, -1, 50, 17, -1, 600])
        k2, v2, k3, v3 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
        ta.store_kv_cache(k, v, k2, v2, slots)
        write_kv(k3, v3, k, v, slots)
        assert torch.equal(k2, k3) and torch.equal(v2, v3)
    print("OK", worst)
""")


def test_triton_decode_matches_sdpa():
    """Runs in a subprocess: TRITON_INTERPRET must be set before triton is imported, and must not leak
    into this process (on a GPU machine it would turn the real kernels into the interpreter)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton): the Triton decode kernel is untested here")
    pythonpath = str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=pythonpath)
    r = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    print("\n" + r.stdout.strip())
