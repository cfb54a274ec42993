"""The Triton segmented LoRA kernels (workers/engine/triton_lora.py, `lora_mode="triton"`).

Checked against an independent float64 reference (plain per-row matmuls on the PEFT A/B matrices read
back from the adapter files) and against the torch paths (sgmv, bmm) over the same slot stacks, for
decode rows, ragged prefill segments and a mix with base (slot 0) rows in the runner's order, on every
fused projection (qkv, o, gate_up, down) with adapters that target different subsets at ranks below
the slot capacity; then a whole tiny-model forward, "triton" against "sgmv".

Without CUDA the kernels run in the Triton interpreter: TRITON_INTERPRET is set before the kernel
module is imported (it decides at definition time). On a CUDA machine the same tests run the
compiled kernels on the GPU.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install triton): the Triton LoRA kernels are untested here",
                allow_module_level=True)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
    if "workers.engine.triton_lora" in sys.modules:      # defined earlier without the interpreter
        importlib.reload(sys.modules["workers.engine.triton_lora"])

from safetensors.torch import load_file  # noqa: E402

from bench.lora_bench import write_peft_adapter  # noqa: E402
from workers.engine import triton_lora  # noqa: E402
from workers.engine.config import EngineConfig, ModelConfig  # noqa: E402
from workers.engine.lora import KINDS, AdapterManager, LoraBatch, module_dims  # noqa: E402

R_MAX = 8
# hidden 128 (two shrink K tiles), q 64 + k 32 + v 32 = 128 and gate 96 + up 96: one expand column
# tile covers several sub-projections; down's K = 96 is not a multiple of the 64-wide K tile.
CFG = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)
# name -> (rank, alpha, targets): together every target; ranks below R_MAX; sub-projection gaps
ADAPTERS = {
    "all": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "qv": (4, 8, ["q_proj", "v_proj"]),
    "mlp": (3, 6, ["gate_proj", "up_proj", "down_proj"]),
    "k_up_o": (6, 3, ["k_proj", "up_proj", "o_proj"]),
}
# token rows -> adapter index (0 = base model, i = the i-th adapter), in the runner's order: prefill
# segments first, then decodes, each ordered by slot
CASES = {
    "decode": [1, 2, 3, 4],
    "prefill": [1] * 5 + [2] * 17 + [3] * 33 + [4] * 2,
    "mixed": [0] * 3 + [1] * 20 + [3] * 7 + [0, 0, 1, 2, 2, 4],
}
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}      # relative to the largest delta


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton_loras")
    return {name: write_peft_adapter(root / name, CFG, r=r, alpha=a, targets=t, seed=i, std=0.2)
            for i, (name, (r, a, t)) in enumerate(ADAPTERS.items())}


def _manager(adapter_dirs, dtype) -> tuple[AdapterManager, list[int]]:
    mgr = AdapterManager(CFG, max_loras=len(ADAPTERS), max_lora_rank=R_MAX, device=DEV, dtype=dtype)
    slots = [0] + [mgr.load(name, adapter_dirs[name]) for name in ADAPTERS]
    return mgr, slots


@pytest.fixture(scope="module")
def managers(adapter_dirs):
    return {dtype: _manager(adapter_dirs, dtype) for dtype in TOL}


def _reference_delta(adapter_dirs, rows: list[int], kind: str, layer: int, x: torch.Tensor) -> torch.Tensor:
    """float64, per row, from the adapter files: sum over the kind's targeted subs of
    scaling * B @ (A @ x), the sub-projections' outputs side by side."""
    dims = module_dims(CFG)
    names = list(ADAPTERS)
    out = torch.zeros(len(rows), sum(dims[s][1] for s in KINDS[kind]), dtype=torch.float64)
    files = {n: load_file(str(adapter_dirs[n] / "adapter_model.safetensors")) for n in names}
    for t, a in enumerate(rows):
        if a == 0:
            continue
        name = names[a - 1]
        r, alpha, targets = ADAPTERS[name]
        col = 0
        for sub in KINDS[kind]:
            width = dims[sub][1]
            if sub in targets:
                part = "self_attn" if sub in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                pre = f"base_model.model.model.layers.{layer}.{part}.{sub}"
                A = files[name][f"{pre}.lora_A.weight"].double()         # [r, in]
                B = files[name][f"{pre}.lora_B.weight"].double()         # [out, r]
                out[t, col:col + width] = (alpha / r) * (B @ (A @ x[t].double()))
            col += width
    return out


def _inputs(kind: str, n_rows: int, dtype, seed: int):
    dims = module_dims(CFG)
    subs = KINDS[kind]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, dims[subs[0]][0], generator=g)
    base = torch.randn(n_rows, sum(dims[s][1] for s in subs), generator=g)
    return x.to(dtype).to(DEV), base.to(dtype).to(DEV)


@pytest.mark.parametrize("dtype", list(TOL), ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference_and_torch_paths(adapter_dirs, managers, case, dtype):
    mgr, slots = managers[dtype]
    rows = CASES[case]
    token_slots = [slots[a] for a in rows]
    layer = 1
    for ki, kind in enumerate(KINDS):
        x, base = _inputs(kind, len(rows), dtype, seed=10 * ki + len(rows))
        ref = _reference_delta(adapter_dirs, rows, kind, layer, x.cpu())
        got = {}
        for mode in ("triton", "sgmv", "bmm"):
            out = base.clone()
            LoraBatch.build(mgr, token_slots, mode=mode, device=DEV).apply(layer, ki, x, out)
            got[mode] = out.cpu()
        delta = got["triton"].double() - base.cpu().double()
        scale = ref.abs().max().item()
        assert scale > 0.1, (case, kind)                    # the adapters do change every projection
        err = (delta - ref).abs().max().item() / scale
        assert err < TOL[dtype], (case, kind, err)
        for mode in ("sgmv", "bmm"):
            diff = (got["triton"].double() - got[mode].double()).abs().max().item() / scale
            assert diff < TOL[dtype], (case, kind, mode, diff)
        base_rows = [t for t, a in enumerate(rows) if a == 0]
        assert torch.equal(got["triton"][base_rows], base.cpu()[base_rows])   # slot-0 rows untouched


@pytest.mark.parametrize("block_m,split_k", [(16, 2), (64, 1), (64, 3)])
def test_tile_heights_and_split_k(adapter_dirs, managers, block_m, split_k):
    """The kernels called directly: 64-row tiles (long prefills) and the shrink's split-K partial sums
    (decode batches), float32 against the float64 reference."""
    mgr, slots = managers[torch.float32]
    rows = CASES["mixed"]
    layers = mgr._ensure_stacks()
    segs, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[start]:
            a = rows[start]
            if a:
                segs.append((start, i, slots[a], ADAPTERS[list(ADAPTERS)[a - 1]][0], a))
            start = i
    targets = {a: ADAPTERS[name][2] for a, name in enumerate(ADAPTERS, start=1)}
    for ki, (kind, subs) in enumerate(KINDS.items()):
        masks = {a: sum(1 << j for j, sb in enumerate(subs) if sb in targets[a]) for a in targets}
        table = triton_lora.tile_rows([(s, e, slot, r, masks[a]) for s, e, slot, r, a in segs], block_m)
        tiles = torch.tensor(table, dtype=torch.int32, device=DEV).view(-1, triton_lora.TILE_COLS)
        x, base = _inputs(kind, len(rows), torch.float32, seed=ki)
        out = base.clone()
        triton_lora.sgmv(x, layers[0].A[ki], layers[0].B[ki], out, tiles, r_max=R_MAX, block_m=block_m,
                         split_k=split_k)
        ref = _reference_delta(adapter_dirs, rows, kind, 0, x.cpu())
        err = ((out.cpu().double() - base.cpu().double()) - ref).abs().max().item() / ref.abs().max().item()
        assert err < TOL[torch.float32], (kind, err)
    assert triton_lora.effective_split_k(128, split_k) == min(split_k, 2)   # K = 128: two 64-wide K tiles


def test_tile_table_and_heuristics():
    # slot-0 segments and adapters without this kind's subs get no tiles; long segments are cut
    assert triton_lora.tile_rows([(0, 3, 0, 0, 0), (3, 40, 2, 8, 0b101), (40, 41, 3, 4, 0)], 16) == [
        3, 19, 2, 8, 5, 19, 35, 2, 8, 5, 35, 40, 2, 8, 5]
    assert triton_lora.pick_block_m(1) == 16 and triton_lora.pick_block_m(512) == 64
    assert triton_lora.pick_split_k(n_tiles=8, n_cols=48, k=4096) > 1          # decode: split K
    assert triton_lora.pick_split_k(n_tiles=512, n_cols=48, k=4096) == 1       # prefill: enough tiles


def test_whole_model_forward_triton_matches_sgmv(paged_kv, tmp_path):
    """Tiny random model, three prompts (base, two adapters) as one prefill batch, then decodes through
    the engine: "triton" and "sgmv" agree on the hidden states and the greedy tokens."""
    from batcher.engine import Engine
    from workers.engine import SamplingParams
    from workers.engine.loader import load_model
    lm = load_model("x", random_weights="tiny", seed=1, device=DEV)
    dirs = {f"t{i}": write_peft_adapter(tmp_path / f"t{i}", lm.config, r=r, alpha=2 * r, targets=t, seed=20 + i,
                                        std=0.3)
            for i, (r, t) in enumerate([(8, ADAPTERS["all"][2]), (4, ["q_proj", "v_proj", "down_proj"])])}
    engines = {mode: Engine(lm, EngineConfig(device=DEV, num_kv_blocks=64, max_loras=2, max_lora_rank=8,
                                             lora_mode=mode, enable_prefix_caching=False,
                                             lora_adapters={k: str(v) for k, v in dirs.items()}))
               for mode in ("triton", "sgmv")}
    prompts = [lm.tokenizer.encode(p) for p in ("hello there, tiny model", "one two three four five", "abc")]
    names = [None, "t0", "t1"]
    hidden = {}
    for mode, eng in engines.items():
        slots = [0] + [eng.load_adapter(n, str(dirs[n])) for n in names[1:]]
        kv = paged_kv(lm.config, num_blocks=16, device=DEV)
        meta = kv.meta([(len(p), len(p), kv.alloc(len(p))) for p in prompts], [])
        ids = torch.tensor([t for p in prompts for t in p], device=DEV)
        pos = torch.tensor([i for p in prompts for i in range(len(p))], device=DEV)
        token_slots = [s for p, s in zip(prompts, slots) for _ in p]
        with torch.inference_mode():
            hidden[mode] = lm.model(ids, pos, meta, kv.caches,
                                    lora=LoraBatch.build(eng.runner.lora, token_slots, mode=mode, device=DEV)).cpu()
            if mode == "sgmv":
                kv = paged_kv(lm.config, num_blocks=16, device=DEV)
                meta = kv.meta([(len(p), len(p), kv.alloc(len(p))) for p in prompts], [])
                plain = lm.model(ids, pos, meta, kv.caches).cpu()
    n0 = len(prompts[0])
    assert torch.equal(plain[:n0], hidden["sgmv"][:n0])
    assert (hidden["sgmv"][n0:] - plain[n0:]).abs().max().item() > 1e-2           # the adapters matter
    assert (hidden["triton"] - hidden["sgmv"]).abs().max().item() < 1e-4
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    toks = {mode: [o.token_ids for o in eng.generate(prompts, sp, adapter_ids=names)] for mode, eng in engines.items()}
    assert toks["triton"] == toks["sgmv"]
