"""Native float32 CPU kernels (workers/engine/kernels/): GGUF block matmuls and fused decode ops.

GGUF block weights: the native kernels multiply by exactly the float32 model's weights.

SmolLM2 ships as Q4_1 (projections) + Q8_0 (tied embedding / lm_head). The engine keeps the fp32
weights dequantized from those blocks and, for decode batches of up to block_weights_max_rows rows,
multiplies through workers/engine/kernels/block_linear.cpp instead. These tests pin down that the
blocks are the same weights (q/k rope rows un-permuted, q/k/v and gate/up fused in the same order),
that the kernel equals x @ W.T up to float summation order, and that greedy decoding one sequence at
a time through the kernels still equals transformers.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from workers.engine.block_weights import BlockWeight, attach_block_weights, projections
from workers.engine.kernels.build import load

pytestmark = pytest.mark.skipif(not load(), reason="native kernels could not be built here (no g++?)")


@pytest.fixture(scope="module")
def blocked():
    """A separate SmolLM2 instance with blocks attached (the session fixture stays fp32-only)."""
    from workers.engine.loader import load_model
    lm = load_model("smollm2-135m")
    n = attach_block_weights(lm.model, lm.gguf_path, max_rows=16)
    assert n == 4 * lm.config.num_hidden_layers + 1, "every projection and the lm_head should get blocks"
    return lm


def test_blocks_dequantize_to_exactly_the_float32_weights(blocked):
    fmts = set()
    for mod, _ in projections(blocked.model):
        bw = mod.blocks
        fmts.add(bw.fmt)
        assert torch.equal(bw.dequantize(), mod.weight.float()), (bw.fmt, tuple(mod.weight.shape))
    assert fmts == {"q4_1", "q8_0"}



def test_attaching_again_keeps_the_blocks_and_takes_the_new_row_limit(blocked):
    """A second engine on the same loaded model neither re-reads nor repacks the blocks."""
    before = [mod.blocks for mod, _ in projections(blocked.model)]
    try:
        assert attach_block_weights(blocked.model, blocked.gguf_path, max_rows=8) == len(before)
        after = [mod.blocks for mod, _ in projections(blocked.model)]
        assert all(a is b for a, b in zip(after, before)) and {b.max_rows for b in after} == {8}
    finally:
        attach_block_weights(blocked.model, blocked.gguf_path, max_rows=16)

@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9, 16])
def test_kernel_equals_float32_matmul(blocked, rows):
    """Row counts on both sides of the kernel's 4-row passes; both formats (qkv is Q4_1, lm_head Q8_0)."""
    g = torch.Generator().manual_seed(rows)
    for mod in (blocked.model.model.layers[3].self_attn.qkv_proj, blocked.model.model.layers[7].mlp.down_proj,
                blocked.model.lm_head):
        x = torch.randn(rows, mod.weight.shape[1], generator=g)
        ref = x.double() @ mod.weight.double().T
        got = mod.blocks.linear(x)
        assert got.shape == (rows, mod.weight.shape[0]) and got.dtype == torch.float32
        rel = ((got.double() - ref).abs().max() / ref.abs().max()).item()
        assert rel < 1e-5, (mod.blocks.fmt, rows, rel)


def test_kernel_rejects_mismatched_shapes(blocked):
    bw = blocked.model.model.layers[0].self_attn.o_proj.blocks
    with pytest.raises(RuntimeError, match="does not match"):
        bw.op(torch.randn(2, bw.in_features + 32), bw.qs, bw.scales)


def test_blocks_of_other_weights_are_refused(blocked):
    """attach compares the blocks with the fp32 weights (first and last row): a cache converted from a
    different file must never be mixed with this file's blocks."""
    from workers.engine.block_weights import _block_weight, read_gguf_blocks
    cfg = blocked.config
    blocks = read_gguf_blocks(blocked.gguf_path, cfg.num_attention_heads, cfg.num_key_value_heads)
    ops = {"q4_1": torch.ops.switchyard.q4_1_linear, "q8_0": torch.ops.switchyard.q8_0_linear}
    name = "model.layers.0.self_attn.o_proj.weight"
    w = blocked.model.model.layers[0].self_attn.o_proj.weight
    assert _block_weight([blocks[name]], w, 16, ops) is not None
    assert _block_weight([blocks[name]], w + 1e-3, 16, ops) is None
    assert _block_weight([blocks["model.layers.1.self_attn.o_proj.weight"]], w, 16, ops) is None


@pytest.mark.slow
def test_one_at_a_time_greedy_through_the_kernels_matches_hf(hf_smollm2):
    """Batch-1 decode is the kernels' whole point: every decode matmul and the lm_head run on blocks."""
    from batcher.engine import Engine
    from workers.engine import SamplingParams
    from workers.engine.config import EngineConfig
    from workers.engine.loader import load_model
    eng = Engine(load_model("smollm2-135m"), EngineConfig(block_weights=True))
    assert eng.core.runner.model.lm_head.blocks is not None
    prompts = ["The capital of France is", "def fibonacci(n):\n", "Les élèves ont étudié"]
    for p in prompts:
        ours = eng.generate([p], SamplingParams(max_tokens=24, temperature=0.0))[0].token_ids
        ids = torch.tensor([eng.tokenizer.encode(p)])
        with torch.no_grad():
            ref = hf_smollm2.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
        eos = set(eng.tokenizer.eos_token_ids)
        ref = ref[:next((i + 1 for i, t in enumerate(ref) if t in eos), len(ref))]
        assert ours == ref, (p, ours, ref)


def test_disabled_by_config_and_environment(monkeypatch):
    from workers.engine.config import EngineConfig
    from workers.engine.loader import load_model
    from workers.engine.model_runner import ModelRunner
    off = ModelRunner(load_model("smollm2-135m"), EngineConfig(cpu_kernels=False, num_kv_blocks=8))
    assert off.model.lm_head.blocks is None
    monkeypatch.setenv("SWITCHYARD_CPU_KERNELS", "0")
    env_off = ModelRunner(load_model("smollm2-135m"), EngineConfig(num_kv_blocks=8))
    assert env_off.model.lm_head.blocks is None


def test_random_weights_have_no_blocks():
    from workers.engine.config import EngineConfig
    from workers.engine.loader import load_model
    from workers.engine.model_runner import ModelRunner
    r = ModelRunner(load_model("random", random_weights="tiny"), EngineConfig(num_kv_blocks=8))
    assert r.model.lm_head.blocks is None


def test_without_a_compiler_the_engine_keeps_fp32(tmp_path):
    """No g++ (CXX=/bin/false, empty kernel cache): load() warns and returns False, nothing raises."""
    code = ("from workers.engine.kernels.build import load; import sys; sys.exit(0 if load() is False else 1)")
    env = {**os.environ, "CXX": "/bin/false", "SWITCHYARD_KERNEL_DIR": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "native CPU kernels unavailable" in res.stderr


def test_dequantize_reference_layout():
    """Q4_1 low nibbles are weights 0-15, high nibbles 16-31; (d * q) + m; Q8_0 is d * int8."""
    import numpy as np
    blk = np.zeros((1, 20), np.uint8)
    blk[0, 0:2] = np.array([0.5], np.float16).view(np.uint8)     # d
    blk[0, 2:4] = np.array([-1.0], np.float16).view(np.uint8)    # m
    blk[0, 4:20] = np.arange(16, dtype=np.uint8) | (np.uint8(15) << 4)
    w = BlockWeight.from_blocks("q4_1", blk, 32).dequantize()[0]
    assert w[:16].tolist() == [0.5 * q - 1.0 for q in range(16)] and w[16:].tolist() == [6.5] * 16
    blk8 = np.zeros((1, 34), np.uint8)
    blk8[0, 0:2] = np.array([0.25], np.float16).view(np.uint8)
    blk8[0, 2:34] = np.arange(-16, 16, dtype=np.int8).view(np.uint8)
    assert BlockWeight.from_blocks("q8_0", blk8, 32).dequantize()[0].tolist() == [0.25 * q for q in range(-16, 16)]


def test_add_rms_norm_is_the_residual_add_then_rmsnorm():
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    for T in (1, 5, 40):
        h, d = torch.randn(T, 576, generator=g) * 3, torch.randn(T, 576, generator=g)
        w = torch.randn(576, generator=g)
        new_h, y = torch.ops.switchyard.add_rms_norm(h, d, w, 1e-5)
        assert torch.equal(new_h, h + d)
        torch.testing.assert_close(y, F.rms_norm(h + d, (576,), w, 1e-5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows, rank, widths", [
    (1, 16, (576, 192)),      # decode, one row per adapter: 64- and 48-column tiles
    (3, 8, (100,)),           # 3 rows; 24 shrink columns = a 16-tile and single columns; ragged expand
    (6, 16, (1536, 40)),      # more rows than one 4-row pass; 40 = a 32-tile and single columns
])
def test_lora_block_apply_adds_each_slots_delta(rows, rank, widths):
    """out[r] += sum_j (x[r] A[slot]) B_j[slot] for the rows of each slot in the block, compared with
    float64 matmuls; the columns of `out` beyond the deltas stay untouched."""
    g = torch.Generator().manual_seed(rows)
    slots, s0, n, fin = 5, 1, 3, 70
    A = torch.randn(slots, fin, len(widths) * rank, generator=g)
    Bs = [torch.randn(slots, rank, w, generator=g) for w in widths]
    offsets = [sum(widths[:j]) for j in range(len(widths))]
    x = torch.randn(n * rows, fin, generator=g)
    out0 = torch.randn(n * rows, sum(widths) + 3, generator=g)   # wider than the deltas: untouched columns
    out = out0.clone()
    torch.ops.switchyard.lora_block_apply(x, out, A, Bs, offsets, s0, n, rows, rank)
    want = out0.double()
    for i in range(n):
        r = slice(i * rows, (i + 1) * rows)
        xa = x[r].double() @ A[s0 + i].double()
        for j, (o, w) in enumerate(zip(offsets, widths)):
            want[r, o:o + w] += xa[:, j * rank:(j + 1) * rank] @ Bs[j][s0 + i].double()
    assert (out.double() - want).abs().max().item() < 1e-3
    assert torch.equal(out[:, sum(widths):], out0[:, sum(widths):])


@pytest.mark.parametrize("table_dtype", [torch.int32, torch.int64])
def test_native_decode_attention_equals_sdpa(table_dtype):
    """GQA (9 query heads over 3 KV heads), contexts of different lengths across blocks not in order,
    and a padding row (length 0, as the padded decode path sends) that must stay finite."""
    from workers.engine.attention import decode_attention_torch
    g = torch.Generator().manual_seed(1)
    nb, bs, kvh, h, d = 24, 16, 3, 9, 64
    kc, vc = torch.randn(nb, bs, kvh, d, generator=g), torch.randn(nb, bs, kvh, d, generator=g)
    lens = torch.tensor([1, 17, 70, 0], dtype=torch.int32)
    tables = torch.tensor([[5, 0, 0, 0, 0], [3, 9, 0, 0, 0], [20, 2, 11, 7, 13], [0, 0, 0, 0, 0]], dtype=table_dtype)
    q = torch.randn(4, h, d, generator=g)
    got = torch.ops.switchyard.paged_decode_attention(q, kc, vc, tables, lens, d ** -0.5)
    ref = decode_attention_torch(q, kc, vc, tables, lens, int(lens.max()), d ** -0.5)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_engine_outputs_do_not_depend_on_the_cpu_kernels():
    """The same batch (prefill then mixed decode) greedy, with the kernels and with plain torch ops."""
    from batcher.engine import Engine
    from workers.engine import SamplingParams
    from workers.engine.config import EngineConfig
    from workers.engine.loader import load_model
    prompts = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time", "SELECT name FROM"]
    outs = []
    for on in (True, False):
        eng = Engine(load_model("smollm2-135m"), EngineConfig(cpu_kernels=on, num_kv_blocks=64))
        assert eng.runner.model.fused_cpu_ops is on
        outs.append([o.token_ids for o in eng.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0))])
    assert outs[0] == outs[1]


def test_gguf_blocks_are_cached_beside_the_conversion(tmp_path, monkeypatch):
    """Parsing the GGUF (its whole vocabulary) takes seconds: the first read writes
    gguf_blocks.safetensors into the conversion cache folder, later reads map it, with equal bytes."""
    import numpy as np

    from workers.engine.block_weights import read_gguf_blocks
    from workers.engine.gguf_convert import cache_dir_for
    from workers.engine.loader import smollm2_gguf_path
    monkeypatch.setenv("SWITCHYARD_CACHE_DIR", str(tmp_path))
    gguf_path = smollm2_gguf_path()
    folder = cache_dir_for(gguf_path)
    folder.mkdir(parents=True)
    parsed = read_gguf_blocks(gguf_path, 9, 3)
    assert (folder / "gguf_blocks.safetensors").exists()
    cached = read_gguf_blocks(gguf_path, 9, 3)
    assert parsed.keys() == cached.keys() and len(parsed) == 30 * 7 + 1
    for name, (fmt, a) in parsed.items():
        assert cached[name][0] == fmt and np.array_equal(cached[name][1], a), name
