"""The engine on CUDA: what only a GPU can show (skipped without one; bench/gpu_suite.sh runs it first).

- launching a step does no host synchronisation (torch's sync debug mode turns any into an error);
- float32 greedy equals HF float32 greedy on the random-weight 1B shape (short sequences), through
  the Triton prefill, decode and KV-store kernels, CUDA graphs and overlapped steps;
- bf16: teacher-forced top-1 agrees with HF bf16 on at least 99% of positions;
- the varlen prefill kernel, compiled, matches its torch reference on a ragged mixed case.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = [[128000, 791, 6864, 315, 9822, 374], [128000, 755, 3460, 16711, 7, 77, 1680],
           [128000] + list(range(1000, 1040)), [128000, 16, 11, 220, 17, 11, 220, 18]]


def _engine(shape: str, dtype: str, **kw):
    from batcher.engine import Engine
    return Engine.from_model("random", random_weights=shape, device="cuda", dtype=dtype, seed=0,
                             max_model_len=2048, max_num_seqs=16, **kw)


def test_launching_a_step_never_waits_for_the_device():
    from workers.engine import SamplingParams
    from workers.engine.plan import NewRequestPlan, RunningRequestPlan, StepPlan
    eng = _engine("tiny", "bfloat16")
    runner = eng.runner
    sp = SamplingParams(max_tokens=8, temperature=0.8, top_k=20, top_p=0.9, seed=1)
    prompts = [[t % eng.loaded.config.vocab_size for t in p] for p in PROMPTS]
    prefill = StepPlan(1, new_requests=[NewRequestPlan(f"r{i}", p, len(p), 0, len(p), [4 * i, 4 * i + 1, 4 * i + 2],
                                                       sp, i) for i, p in enumerate(prompts)])
    decode = StepPlan(2, running=[RunningRequestPlan(f"r{i}", 1) for i in range(len(PROMPTS))])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        first = runner.launch(prefill)
        second = runner.launch(decode)          # its inputs are the first step's samples, on the device
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(first.result().token_ids) == len(PROMPTS) and len(second.result().token_ids) == len(PROMPTS)


def test_float32_greedy_equals_hf_on_the_1b_shape():
    from bench.common import load_hf_model
    from workers.engine import SamplingParams
    eng = _engine("llama-1b", "float32")
    assert eng.runner.overlaps and eng.runner.decode_graphs is not None
    hf = load_hf_model(eng.loaded, "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    outs = eng.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    for p, o in zip(PROMPTS, outs):
        ref = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=16, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert o.token_ids == ref


def test_bf16_teacher_forced_top1_agrees_with_hf():
    from bench.common import load_hf_model
    from workers.engine import SamplingParams
    eng = _engine("llama-1b", "bfloat16")
    hf = load_hf_model(eng.loaded, "cuda")
    agree = total = 0
    outs = eng.generate(PROMPTS, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    for p, o in zip(PROMPTS, outs):
        seq = torch.tensor([p + o.token_ids], device="cuda")
        with torch.no_grad():
            hf_top = hf(seq).logits[0, len(p) - 1:-1].argmax(-1).tolist()
        agree += sum(a == b for a, b in zip(hf_top, o.token_ids))
        total += len(o.token_ids)
    assert agree / total >= 0.99, (agree, total)


def test_compiled_prefill_kernel_matches_the_reference():
    from workers.engine import triton_prefill as tp
    g = torch.Generator(device="cuda").manual_seed(0)
    nb, bs, kvh, h, d = 64, 16, 2, 8, 64
    kc = torch.randn(nb, bs, kvh, d, device="cuda", generator=g, dtype=torch.bfloat16)
    vc = torch.randn(nb, bs, kvh, d, device="cuda", generator=g, dtype=torch.bfloat16)
    table = torch.randperm(nb, device="cuda", generator=g).to(torch.int32).view(4, 16)
    qlens, seqlens = [40, 5, 17, 1], [70, 5, 33, 100]
    rows = torch.tensor([2, 0, 3, 1], dtype=torch.int32, device="cuda")
    qsl = torch.tensor([0, 40, 45, 62, 63], dtype=torch.int32, device="cuda")
    q = torch.randn(63, h, d, device="cuda", generator=g, dtype=torch.bfloat16)
    sl = torch.tensor(seqlens, dtype=torch.int32, device="cuda")
    out = tp.paged_prefill_attention(q, kc, vc, table, rows, qsl, sl, max(qlens), d ** -0.5)
    ref = tp.paged_prefill_attention_torch(q, kc, vc, table, rows, qsl, sl, max(qlens), d ** -0.5)
    assert (out.float() - ref.float()).abs().max().item() < 2e-2
