"""Our paged LlamaForCausalLM against transformers on the same weights.

Measured on CPU float32 (SmolLM2-135M, 8 prompts x 64 greedy tokens): greedy tokens identical; max abs
logit difference over every generated position (444 of them) 6.2e-5 (asserted < 1e-3). Chunked prefill and the mixed
batch agree with the one-shot / one-sequence runs to 2.4e-5 / 4.2e-5 (asserted < 1e-4). Tiny random HF
checkpoints (llama3 rope + sharded, linear rope + tied, Qwen2 biases): < 1e-4 vs transformers.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from workers.engine.attention import build_attention_metadata

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived",
    "1, 2, 3, 4, 5, 6, 7,",
    "Translate to French: I would like a cup of coffee, please. ->",
    "Les élèves ont étudié l'histoire de la Révolution française 🇫🇷 et",
    "<|im_start|>user\nWhat is 17 * 23? Explain step by step.<|im_end|>\n<|im_start|>assistant\n",
    "   Leading spaces and\ttabs: the quick brown fox jumps over the lazy dog.   \n\n",
]
N_NEW = 64
LOGIT_TOL = 1e-3
BATCH_TOL = 1e-4


@torch.no_grad()
def greedy_generate(lm, kv, prompts: list[list[int]], max_new: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Test helper (not an engine API): batched greedy decoding through the paged cache.

    Step 0 is one forward over all prompts (one prefill segment each); every later step is one forward
    with a decode token per unfinished sequence. A sequence stops after an EOS or max_new tokens.
    Returns per sequence: generated ids and the float32 logits [len(generated), vocab] they came from."""
    model = lm.model
    eos = set(lm.tokenizer.eos_token_ids)
    tables = [kv.alloc(len(p) + max_new) for p in prompts]
    ids = [t for p in prompts for t in p]
    pos = [i for p in prompts for i in range(len(p))]
    meta = kv.meta([(len(p), len(p), tb) for p, tb in zip(prompts, tables)], [])
    h = model(torch.tensor(ids), torch.tensor(pos), meta, kv.caches)
    last = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
    step_logits = model.compute_logits(h[last])
    outs = [[int(x)] for x in step_logits.argmax(-1)]
    logits = [[row] for row in step_logits]
    while True:
        live = [i for i, o in enumerate(outs) if len(o) < max_new and o[-1] not in eos]
        if not live:
            return outs, [torch.stack(lg) for lg in logits]
        ctx = [len(prompts[i]) + len(outs[i]) for i in live]
        meta = kv.meta([], [(c, tables[i]) for c, i in zip(ctx, live)])
        h = model(torch.tensor([outs[i][-1] for i in live]), torch.tensor([c - 1 for c in ctx]), meta, kv.caches)
        step_logits = model.compute_logits(h)
        for i, row in zip(live, step_logits):
            logits[i].append(row)
            outs[i].append(int(row.argmax()))


def _trim_after_eos(ids: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i + 1]
    return ids


@pytest.mark.slow
def test_greedy_and_logits_match_hf(smollm2, hf_smollm2, paged_kv):
    """8 prompts x 64 greedy tokens. HF side: one batched generate (left padding), then one batched
    forward (right padding) over prompt + our continuation for the logits at every generated position."""
    tok = smollm2.tokenizer
    eos = set(tok.eos_token_ids)
    pad = tok.eos_token_ids[0]
    prompts = [tok.encode(p) for p in PROMPTS]
    kv = paged_kv(smollm2.config, num_blocks=len(prompts) * 8)
    ours, our_logits = greedy_generate(smollm2, kv, prompts, N_NEW)

    width = max(len(p) for p in prompts)
    left = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    left_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        ref = hf_smollm2.generate(left, attention_mask=left_mask, max_new_tokens=N_NEW, do_sample=False,
                                  pad_token_id=pad)
    for i, prompt in enumerate(PROMPTS):
        theirs = _trim_after_eos(ref[i, width:].tolist(), eos)
        assert ours[i] == theirs, f"greedy mismatch for {prompt!r}:\nours   {ours[i]}\ntheirs {theirs}"

    full = [p + o[:-1] for p, o in zip(prompts, ours)]
    width = max(len(f) for f in full)
    right = torch.tensor([f + [pad] * (width - len(f)) for f in full])
    right_mask = torch.tensor([[1] * len(f) + [0] * (width - len(f)) for f in full])
    with torch.no_grad():
        hf_logits = hf_smollm2(right, attention_mask=right_mask).logits.float()
    worst = 0.0
    for i, (p, o) in enumerate(zip(prompts, ours)):
        diff = (our_logits[i] - hf_logits[i, len(p) - 1:len(p) - 1 + len(o)]).abs().max().item()
        worst = max(worst, diff)
        assert diff < LOGIT_TOL, (PROMPTS[i], diff)
    n_pos = sum(len(o) for o in ours)
    print(f"\nmax |logit diff| vs HF over {n_pos} generated positions of {len(PROMPTS)} prompts: {worst:.2e}")


def _prefill_logits(lm, kv, ids, chunks: list[int]) -> torch.Tensor:
    """Feed `ids` through the paged cache in chunks; logits of the last token."""
    model = lm.model
    table = kv.alloc(len(ids))
    done = 0
    with torch.no_grad():
        for c in chunks:
            meta = kv.meta([(c, done + c, table)], [])
            h = model(torch.tensor(ids[done:done + c]), torch.arange(done, done + c), meta, kv.caches)
            done += c
        return model.compute_logits(h[-1:])[0]


def test_chunked_prefill_matches_one_shot(smollm2, paged_kv):
    ids = smollm2.tokenizer.encode(PROMPTS[2] + " " + PROMPTS[4] + " " + PROMPTS[5])
    n = len(ids)
    assert n > 40
    one = _prefill_logits(smollm2, paged_kv(smollm2.config, 16), ids, [n])
    a, b = 13, 21                      # chunk boundaries not on block boundaries
    chunked = _prefill_logits(smollm2, paged_kv(smollm2.config, 16), ids, [a, b, n - a - b])
    diff = (one - chunked).abs().max().item()
    print(f"\nchunked vs one-shot prefill: max |logit diff| {diff:.2e}")
    assert diff < BATCH_TOL
    assert int(one.argmax()) == int(chunked.argmax())


def test_mixed_batch_matches_single_sequences(smollm2, paged_kv):
    """Two prefills (one fresh, one continuing a cached prefix) + three decodes in ONE forward."""
    model, tok = smollm2.model, smollm2.tokenizer
    kv = paged_kv(smollm2.config, num_blocks=64)
    prompts = [tok.encode(p) for p in PROMPTS[:5]]
    tables = [kv.alloc(len(p) + 2) for p in prompts]
    # state before the step: seq 1 has a cached prefix of 5 tokens; seqs 2-4 are fully prefilled and
    # decode their first generated token (taken as token 42, 43, 44)
    with torch.no_grad():
        for i in (1, 2, 3, 4):
            n = 5 if i == 1 else len(prompts[i])
            meta = kv.meta([(n, n, tables[i])], [])
            model(torch.tensor(prompts[i][:n]), torch.arange(n), meta, kv.caches)

    p0, p1 = prompts[0], prompts[1]
    dec = [(len(prompts[i]) + 1, tables[i], 40 + i) for i in (2, 3, 4)]
    prefill_specs = [(len(p0), len(p0), tables[0]), (len(p1) - 5, len(p1), tables[1])]
    ids = p0 + p1[5:] + [t for _, _, t in dec]
    pos = list(range(len(p0))) + list(range(5, len(p1))) + [c - 1 for c, _, _ in dec]
    with torch.no_grad():
        meta = build_attention_metadata(prefill_specs, [(c, t) for c, t, _ in dec], kv.block_size, "cpu")
        h = model(torch.tensor(ids), torch.tensor(pos), meta, kv.caches)
        last = [len(p0) - 1, len(p0) + len(p1) - 5 - 1] + [len(ids) - 3, len(ids) - 2, len(ids) - 1]
        batched = model.compute_logits(h[torch.tensor(last)])

        # each alone (rewrites the same KV values into the same slots)
        alone = []
        for (ql, cl, table), toks, p in zip(prefill_specs, (p0, p1[5:]), (0, 5)):
            meta = kv.meta([(ql, cl, table)], [])
            h1 = model(torch.tensor(toks), torch.arange(p, p + ql), meta, kv.caches)
            alone.append(model.compute_logits(h1[-1:])[0])
        for c, table, t in dec:
            meta = kv.meta([], [(c, table)])
            h1 = model(torch.tensor([t]), torch.tensor([c - 1]), meta, kv.caches)
            alone.append(model.compute_logits(h1)[0])
    alone = torch.stack(alone)
    diff = (batched - alone).abs().max().item()
    print(f"\nmixed batch vs single sequences: max |logit diff| {diff:.2e}")
    assert diff < BATCH_TOL
    assert torch.equal(batched.argmax(-1), alone.argmax(-1))


# -------------------------------------------------------------------------------------------------
# other Llama-family configs: tiny random HF checkpoints written by transformers, loaded by us

def _tiny_hf_checkpoint(tmp_path, smollm2_dir, kind: str):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=[2, 0])
    torch.manual_seed(0)
    if kind == "llama3":
        cfg = transformers.LlamaConfig(**common, head_dim=32, tie_word_embeddings=False, rope_theta=500000.0,
                                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 64})
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "linear":
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=True, rope_theta=10000.0,
                                       rope_scaling={"rope_type": "linear", "factor": 4.0})
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=False, rope_theta=1000000.0)
        model = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():     # make the q/k/v biases matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.5)
    model.eval()
    out = tmp_path / kind
    model.save_pretrained(out, max_shard_size="2MB")          # sharded, with an index file
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{smollm2_dir}/{f}", out / f)
    return model, out


@pytest.mark.parametrize("kind", ["llama3", "linear", "qwen2"])
def test_hf_folder_configs(tmp_path, smollm2_dir, paged_kv, kind):
    from workers.engine.loader import load_model

    hf, folder = _tiny_hf_checkpoint(tmp_path, smollm2_dir, kind)
    assert (folder / "model.safetensors.index.json").exists()
    lm = load_model(str(folder))
    assert lm.config.eos_token_ids[:2] == [2, 0]
    assert lm.config.attention_bias == (kind == "qwen2")
    if kind == "llama3":
        assert lm.config.rope_scaling["rope_type"] == "llama3" and lm.config.head_dim == 32
    json.loads((folder / "config.json").read_text())
    # positions past original_max_position_embeddings exercise the scaled frequencies
    ids = torch.randint(3, 49152, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    kv = paged_kv(lm.config, num_blocks=16)
    table = kv.alloc(len(ids))
    with torch.no_grad():
        h = lm.model(torch.tensor(ids), torch.arange(len(ids)), kv.meta([(len(ids), len(ids), table)], []),
                     kv.caches)
        ours = lm.model.compute_logits(h)
        ref = hf(torch.tensor([ids])).logits[0].float()
    diff = (ours - ref).abs().max().item()
    assert diff < 1e-4, diff


# Teacher forcing in bfloat16: natural text, every position predicted; the last BF16_DECODE tokens of
# each text go through the decode path one step at a time (bf16 KV cache), the rest are prefill rows.
BF16_TEXTS = [
    "The capital of France is Paris, a city on the Seine known for the Eiffel Tower, the Louvre museum and its "
    "cafes, where people sit for hours watching the street.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n    for _ in range(n):\n"
    "        a, b = b, a + b\n    return a\n",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who went out every morning "
    "before sunrise and came back with his nets full.",
    "<|im_start|>user\nWhat is 17 * 23?<|im_end|>\n<|im_start|>assistant\n17 * 23 = 17 * 20 + 17 * 3 = 340 + 51 = "
    "391.<|im_end|>\n",
]
BF16_DECODE = 16
BF16_STEP_TOL = 2.0        # max |logit diff| vs transformers bf16 at any position (logits ~20: 16 bf16 ULPs)
BF16_ERROR_BUDGET = 1.5    # our mean |logit error| vs float32 <= this x transformers-bf16's own


@torch.no_grad()
def _teacher_forced_logits(lm, kv, seqs: list[list[int]], n_decode: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits predicting every token of every sequence after its first ([sum(len-1), vocab], in sequence
    order) and a mask of the rows that came from decode steps."""
    model = lm.model
    prompts = [s[:-n_decode] for s in seqs]
    tables = [kv.alloc(len(s)) for s in seqs]
    meta = kv.meta([(len(p), len(p), t) for p, t in zip(prompts, tables)], [])
    h = model(torch.tensor([t for p in prompts for t in p]), torch.tensor([i for p in prompts for i in range(len(p))]),
              meta, kv.caches)
    rows = list(model.compute_logits(h).split([len(p) for p in prompts]))
    rows = [list(r) for r in rows]
    for j in range(n_decode - 1):
        ctx = [len(p) + j + 1 for p in prompts]
        meta = kv.meta([], [(c, t) for c, t in zip(ctx, tables)])
        h = model(torch.tensor([s[c - 1] for s, c in zip(seqs, ctx)]), torch.tensor([c - 1 for c in ctx]), meta,
                  kv.caches)
        for r, row in zip(rows, model.compute_logits(h)):
            r.append(row)
    is_decode = torch.tensor([i >= len(s) - n_decode for s in seqs for i in range(len(s) - 1)])
    return torch.cat([torch.stack(r) for r in rows]), is_decode


def test_bfloat16_matches_transformers_at_every_position(smollm2, hf_smollm2, hf_smollm2_bf16, paged_kv):
    """Our bf16 model (prefill rows and decode steps through a bf16 paged cache) against transformers in
    bf16 and float32 on the same weights, teacher-forced over 4 texts (173 positions, 60 of them decode steps).

    Measured (CPU): max |logit diff| vs transformers-bf16 1.19 at the worst position (asserted < 2.0);
    mean |logit error| vs float32 1.00x (prefill) and 1.25x (decode) transformers-bf16's own; top-1
    agreement with transformers-bf16 98%. A 5% error in the bf16 decode attention scale: 2.4 and 2.0x."""
    from workers.engine.loader import load_model

    lm16 = load_model(smollm2.path, dtype=torch.bfloat16)
    assert lm16.model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    seqs = [smollm2.tokenizer.encode(t) for t in BF16_TEXTS]
    ours, is_decode = _teacher_forced_logits(lm16, paged_kv(lm16.config, num_blocks=32, dtype=torch.bfloat16),
                                             seqs, BF16_DECODE)
    assert ours.dtype == torch.float32 and int(is_decode.sum()) == len(seqs) * (BF16_DECODE - 1)
    with torch.no_grad():
        ref16 = torch.cat([hf_smollm2_bf16(torch.tensor([s[:-1]])).logits[0].float() for s in seqs])
        ref32 = torch.cat([hf_smollm2(torch.tensor([s[:-1]])).logits[0].float() for s in seqs])
    assert ours.shape == ref16.shape == ref32.shape

    per_step = (ours - ref16).abs().amax(-1)
    worst = int(per_step.argmax())
    assert per_step.max().item() < BF16_STEP_TOL, (worst, bool(is_decode[worst]), per_step.max().item())
    for name, rows in (("prefill", ~is_decode), ("decode", is_decode)):
        ours_err = (ours[rows] - ref32[rows]).abs().mean().item()
        theirs_err = (ref16[rows] - ref32[rows]).abs().mean().item()
        print(f"\nbf16 {name}: mean |logit error| vs float32 {ours_err:.4f} (transformers bf16 {theirs_err:.4f}), "
              f"worst position vs transformers bf16 {per_step[rows].max().item():.3f}")
        assert ours_err <= BF16_ERROR_BUDGET * theirs_err, (name, ours_err, theirs_err)
    top1 = (ours.argmax(-1) == ref16.argmax(-1)).float().mean().item()
    assert top1 >= 0.95, top1
    assert (ours.argmax(-1) == ref32.argmax(-1)).float().mean().item() >= \
        (ref16.argmax(-1) == ref32.argmax(-1)).float().mean().item() - 0.03
