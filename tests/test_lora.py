"""LoRA adapters on SmolLM2-135M (CPU, float32): PEFT equivalence, mixed batches, prefix-cache isolation,
slot swaps under traffic, and the errors for unknown / unservable adapters.

Adapters are made by `peft` itself (bench/peft_reference.py) with seeded normal(0, 0.05) A and B, so every
adapter visibly changes the base model's greedy output. Against transformers + peft, for each of the four
adapter shapes (all seven targets; q/v rsLoRA; attention only; MLP only) and four prompts (one batch), at
every step of an N_LONG-token greedy generation through the engine: the engine's token is peft's top-1
given the same prefix (so the whole generation is peft's greedy one) and the logits it sampled from are
within LOGIT_TOL of peft's (measured max 7.2e-5 over 4 x 4 x 20 steps). First-step logits through the
model directly agree across the gathered (bgmv), padded (bmm) and segmented (sgmv) LoRA paths to BATCH_TOL.
"""
from __future__ import annotations

import json

import pytest
import torch

from batcher.engine import Engine
from bench.peft_reference import import_peft, make_peft_adapter
from workers.engine import EngineConfig, SamplingParams
from workers.engine.errors import InvalidRequestError, UnknownAdapterError
from workers.engine.lora import InvalidAdapterError, LoraBatch

try:
    import_peft()
except ImportError:
    pytest.skip("peft is not installed (pip install peft)", allow_module_level=True)

LOGIT_TOL = 1e-3
BATCH_TOL = 1e-4
N_NEW = 6
N_LONG = 20
GREEDY = SamplingParams(max_tokens=N_NEW, temperature=0.0, ignore_eos=True)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "List three primary colors:", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def hf_base(smollm2_dir):
    """A private transformers copy of SmolLM2 (peft injects layers into it; never shared)."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def adapters(hf_base, tmp_path_factory):
    """name -> folder: a1 all seven targets r=8; a2 q/v only r=16 rsLoRA; a3, a4 attention-only / MLP-only."""
    root = tmp_path_factory.mktemp("loras")
    return {
        "a1": make_peft_adapter(hf_base, root / "a1", seed=1, r=8, alpha=16),
        "a2": make_peft_adapter(hf_base, root / "a2", seed=2, r=16, alpha=8, targets=["q_proj", "v_proj"],
                                use_rslora=True, std=0.04),
        "a3": make_peft_adapter(hf_base, root / "a3", seed=3, r=4, alpha=8,
                                targets=["q_proj", "k_proj", "v_proj", "o_proj"]),
        "a4": make_peft_adapter(hf_base, root / "a4", seed=4, r=8, alpha=8,
                                targets=["gate_proj", "up_proj", "down_proj"]),
    }


def make_engine(loaded, adapters, **kw) -> Engine:
    cfg = EngineConfig(**{"num_kv_blocks": 96, "max_num_batched_tokens": 256, "max_loras": 4,
                          "lora_adapters": {k: str(v) for k, v in adapters.items()}, **kw})
    return Engine(loaded, cfg)


@pytest.fixture(scope="module")
def alone(smollm2, adapters):
    """Greedy tokens per (adapter, prompt) run one request at a time."""
    eng = make_engine(smollm2, adapters, enable_prefix_caching=False)
    return {(a, p): eng.generate(p, GREEDY, adapter_ids=[a])[0].token_ids
            for a in (None, "a1", "a2", "a3", "a4") for p in PROMPTS[:2]}


@pytest.fixture(scope="module")
def runs(smollm2, adapters):
    """adapter -> per prompt (prompt ids, N_LONG greedy tokens, the logits the engine sampled each token
    from [N_LONG, vocab]): the four prompts as one batch through the engine, all with that adapter."""
    eng = make_engine(smollm2, adapters, enable_prefix_caching=False)
    sp = SamplingParams(max_tokens=N_LONG, temperature=0.0, ignore_eos=True)
    steps: list[torch.Tensor] = []
    sample = smollm2.model.compute_logits

    def recording(hidden):
        logits = sample(hidden)
        steps.append(logits.detach().clone())
        return logits
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(smollm2.model, "compute_logits", recording)
        for a in ("a1", "a2", "a3", "a4"):
            steps.clear()
            outs = eng.generate(PROMPTS, sp, adapter_ids=[a] * len(PROMPTS))
            # one row per request per step, in request order (checked: each row's argmax is that
            # request's token at that step - greedy - so a row given to the wrong request fails below)
            assert [s.shape[0] for s in steps] == [len(PROMPTS)] * N_LONG
            out[a] = []
            for i, o in enumerate(outs):
                logits = torch.stack([s[i] for s in steps])
                assert logits.argmax(-1).tolist() == o.token_ids, (a, i)
                out[a].append((o.prompt_token_ids, o.token_ids, logits))
    return out


def test_adapters_change_the_output(alone):
    for a in ("a1", "a2", "a3", "a4"):
        assert any(alone[(a, p)] != alone[(None, p)] for p in PROMPTS[:2]), a


@pytest.mark.parametrize("name", ["a1", "a2", "a3", "a4"])
def test_matches_transformers_peft(smollm2, hf_base, adapters, runs, paged_kv, name):
    """Every step of the engine's generation against transformers + peft, teacher-forced on the engine's
    own tokens (one forward per prompt): equal top-1 at every step means peft's greedy output is the same."""
    PeftModel = import_peft().PeftModel
    peft_model = PeftModel.from_pretrained(hf_base, str(adapters[name])).eval()
    try:
        with torch.no_grad():
            ref = [peft_model(input_ids=torch.tensor([ids + toks[:-1]])).logits[0, len(ids) - 1:].float()
                   for ids, toks, _ in runs[name]]
    finally:
        peft_model.unload()                   # hf_base is the bare base model again
    worst = 0.0
    for p, (_, toks, ours), theirs in zip(PROMPTS, runs[name], ref):
        assert theirs.argmax(-1).tolist() == toks, (name, p)
        per_step = (ours - theirs).abs().amax(-1)
        assert per_step.max().item() < LOGIT_TOL, (name, p, per_step.tolist())
        worst = max(worst, per_step.max().item())
    print(f"\n{name}: max |logit diff| vs peft over {len(PROMPTS)} prompts x {N_LONG} steps: {worst:.2e}")

    # first-step logits through the model directly, every LoRA path
    eng = make_engine(smollm2, {name: adapters[name]})
    slot = eng.load_adapter(name, str(adapters[name]))
    model = smollm2.model
    for (ids, _, _), theirs in zip(runs[name][:2], ref):
        got = {}
        for mode in ("sgmv", "bmm", "bgmv"):
            kv = paged_kv(smollm2.config, num_blocks=8)
            table = kv.alloc(len(ids))
            meta = kv.meta([(len(ids), len(ids), table)], [])
            with torch.inference_mode():
                h = model(torch.tensor(ids), torch.arange(len(ids)), meta, kv.caches,
                          lora=LoraBatch.build(eng.runner.lora, [slot] * len(ids), mode=mode))
                got[mode] = model.compute_logits(h[-1:])[0]
        assert (got["sgmv"] - theirs[0]).abs().max().item() < LOGIT_TOL
        assert (got["bgmv"] - got["sgmv"]).abs().max().item() < BATCH_TOL
        assert (got["bmm"] - got["sgmv"]).abs().max().item() < BATCH_TOL


@pytest.mark.parametrize("mode", ["sgmv", "bmm", "bgmv"])
def test_mixed_batch_equals_alone(smollm2, adapters, alone, mode):
    eng = make_engine(smollm2, adapters, enable_prefix_caching=False, lora_mode=mode)
    names = [None, "a1", "a2", "a3", "a4", "a1"]
    prompts = [PROMPTS[i % 2] for i in range(len(names))]
    outs = eng.generate(prompts, GREEDY, adapter_ids=names)
    assert [o.token_ids for o in outs] == [alone[(a, p)] for a, p in zip(names, prompts)]


def test_prefix_cache_is_per_adapter(smollm2, adapters):
    eng = make_engine(smollm2, adapters)
    prompt = ("You are a concise assistant for a railway company. Answer questions about "
              "timetables, tickets and delays in one sentence, politely and without jargon. "
              "When is the next train to the airport?")
    sp = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    assert len(smollm2.tokenizer.encode(prompt)) > 32
    first = eng.generate(prompt, sp, adapter_ids=["a1"])[0]
    other = eng.generate(prompt, sp, adapter_ids=["a2"])[0]
    base = eng.generate(prompt, sp)[0]
    again = eng.generate(prompt, sp, adapter_ids=["a1"])[0]
    assert first.num_cached_tokens == 0
    assert other.num_cached_tokens == 0 and base.num_cached_tokens == 0
    assert again.num_cached_tokens >= 32
    assert again.token_ids == first.token_ids


def test_swap_under_continuous_requests(smollm2, adapters, alone):
    """4 adapters through 2 slots, requests arriving while others run: none fails, outputs unchanged."""
    eng = make_engine(smollm2, adapters, max_loras=2, enable_prefix_caching=False)
    names = ["a1", "a2", "a3", None, "a4", "a1", "a2", "a4"]
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    want, got, text = {}, {}, {}
    pending = list(enumerate(names))
    while pending or eng.has_unfinished():
        for _ in range(2):          # two arrivals per step
            if pending:
                i, a = pending.pop(0)
                p = PROMPTS[i % 2]
                rid = eng.add_request(p, sp, adapter_id=a)
                want[rid], got[rid] = alone[(a, p)][:4], []
        for o in eng.step():
            got[o.request_id].extend(o.new_token_ids)
            if o.finished:
                text[o.request_id] = o.finish_reason
    assert got == want
    assert set(text.values()) == {"length"} and len(text) == len(names)
    assert eng.runner.lora.num_swaps > 0
    assert eng.allocator.num_free_blocks == eng.allocator.num_blocks


def test_unknown_adapter_rejected_before_queueing(smollm2, adapters):
    eng = make_engine(smollm2, adapters)
    with pytest.raises(UnknownAdapterError, match="nope.*known adapters: a1, a2, a3, a4"):
        eng.add_request("hello", GREEDY, adapter_id="nope")
    assert not eng.has_unfinished() and not eng.scheduler.requests
    eng.unload_adapter("a3")
    with pytest.raises(UnknownAdapterError):
        eng.add_request("hello", GREEDY, adapter_id="a3")
    base = make_engine(smollm2, {}, max_loras=0)
    with pytest.raises(UnknownAdapterError):
        base.add_request("hello", GREEDY, adapter_id="a1")


def test_unservable_adapters_are_refused_with_the_reason(smollm2, hf_base, adapters, tmp_path):
    transformers = pytest.importorskip("transformers")
    eng = make_engine(smollm2, {}, max_lora_rank=16)
    # another base model: same architecture, other widths
    tiny = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    other = make_peft_adapter(tiny, tmp_path / "other", seed=5, r=4)
    with pytest.raises(InvalidAdapterError, match="another base model"):
        eng.load_adapter("other", str(other))
    # a target we do not serve
    lm_head = make_peft_adapter(hf_base, tmp_path / "lmhead", seed=6, r=4, targets=["q_proj", "lm_head"])
    with pytest.raises(InvalidAdapterError, match="lm_head"):
        eng.load_adapter("lmhead", str(lm_head))
    # DoRA
    dora = make_peft_adapter(hf_base, tmp_path / "dora", seed=7, r=4, targets=["q_proj"], use_dora=True)
    with pytest.raises(InvalidAdapterError, match="DoRA"):
        eng.load_adapter("dora", str(dora))
    # rank above the slot capacity
    big = make_peft_adapter(hf_base, tmp_path / "big", seed=8, r=32, targets=["q_proj"])
    with pytest.raises(InvalidAdapterError, match="max_lora_rank=16"):
        eng.load_adapter("big", str(big))
    # a configured-but-bad adapter fails at add_request (INVALID_ARGUMENT), before queueing
    cfg = json.loads((adapters["a1"] / "adapter_config.json").read_text())
    bad = tmp_path / "bad_targets"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj", "embed_tokens"]}))
    (bad / "adapter_model.safetensors").write_bytes((adapters["a1"] / "adapter_model.safetensors").read_bytes())
    eng.runner.lora.register("bad", str(bad))
    with pytest.raises(InvalidRequestError, match="adapter_id: .*embed_tokens"):
        eng.add_request("hello", GREEDY, adapter_id="bad")
    assert not eng.scheduler.requests


def test_a_slot_reused_by_a_smaller_adapter_holds_only_its_weights(smollm2, tmp_path):
    from bench.lora_bench import write_peft_adapter
    from workers.engine.lora import SUPPORTED_TARGETS, AdapterManager
    big = write_peft_adapter(tmp_path / "big", smollm2.config, r=16, alpha=16, targets=SUPPORTED_TARGETS, seed=1)
    small = write_peft_adapter(tmp_path / "small", smollm2.config, r=4, alpha=4, targets=["q_proj"], seed=2)
    reused = AdapterManager(smollm2.config, max_loras=1, max_lora_rank=16)
    reused.load("big", big)
    assert reused.load("small", small) == 1            # evicts big from the only slot
    fresh = AdapterManager(smollm2.config, max_loras=1, max_lora_rank=16)
    fresh.load("small", small)
    for a, b in zip(reused._layers, fresh._layers):
        assert all(torch.equal(x, y) for x, y in zip(a.A, b.A))
        assert all(torch.equal(x, y) for xs, ys in zip(a.B, b.B) for x, y in zip(xs, ys))


@pytest.mark.parametrize("rows", [[0, 1, 1, 2, 2, 3, 3, 4, 4],      # base row, then equal blocks: views, no gather
                                  [1, 1, 1, 2, 3, 3, 0, 4]])         # unequal and split: padded gather
def test_every_lora_path_adds_the_same_delta(smollm2, adapters, rows):
    """sgmv, bmm (padded gather; or the contiguous block: native op when built, else views), bgmv."""
    eng = make_engine(smollm2, adapters)
    slot = {n: eng.load_adapter(n, str(adapters[n])) for n in ("a1", "a2", "a3", "a4")}
    token_slots = [0 if r == 0 else slot[f"a{r}"] for r in rows]
    mgr = eng.runner.lora
    assert (LoraBatch.build(mgr, token_slots, mode="bmm").block is not None) == (rows[0] == 0)
    g = torch.Generator().manual_seed(0)
    dims = {0: (576, 960), 1: (576, 576), 2: (576, 3072), 3: (1536, 576)}
    for kind, (fin, fout) in dims.items():
        x = torch.randn(len(rows), fin, generator=g)
        got = {}
        for mode in ("sgmv", "bmm", "bmm-torch", "bgmv"):
            out = torch.zeros(len(rows), fout)
            batch = LoraBatch.build(mgr, token_slots, mode=mode.removesuffix("-torch"))
            if mode == "bmm-torch":   # the contiguous block without the native op (views + baddbmm_)
                batch.native = False
            batch.apply(3, kind, x, out)
            got[mode] = out
        assert got["sgmv"].abs().max() > 0
        assert (got["bmm"] - got["sgmv"]).abs().max().item() < 1e-5
        assert (got["bmm-torch"] - got["sgmv"]).abs().max().item() < 1e-5
        assert (got["bgmv"] - got["sgmv"]).abs().max().item() < 1e-5
        assert not got["sgmv"][[i for i, r in enumerate(rows) if r == 0]].any()   # base rows untouched


def test_slot_holds_the_peft_weights_transposed_and_scaled(tmp_path):
    """The host copy is packed once in the slots' layout; a slot write (here over a fuller adapter's
    slot) lands A^T and scaling * B^T at a rank below the capacity, zeros everywhere else - an
    untargeted sub-projection of a fused projection included."""
    from safetensors.torch import load_file

    from bench.lora_bench import write_peft_adapter
    from workers.engine.config import ModelConfig
    from workers.engine.lora import KINDS, SUPPORTED_TARGETS, AdapterManager, module_dims
    cfg = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    R, r, targets = 4, 3, ["q_proj", "v_proj", "up_proj", "down_proj"]
    mgr = AdapterManager(cfg, max_loras=1, max_lora_rank=R)
    mgr.load("full", write_peft_adapter(tmp_path / "full", cfg, r=R, alpha=4, targets=SUPPORTED_TARGETS, seed=1))
    path = write_peft_adapter(tmp_path / "a", cfg, r=r, alpha=6, targets=targets, seed=2)
    assert mgr.load("a", path) == 1
    sd = load_file(str(path / "adapter_model.safetensors"))
    ad = mgr.prefetch("a")
    assert ad.nbytes == ad.flat.numel() * 4
    dims = module_dims(cfg)
    for li, st in enumerate(mgr._layers):
        for ki, subs in enumerate(KINDS.values()):
            A = torch.zeros(dims[subs[0]][0], len(subs) * R)
            for j, sub in enumerate(subs):
                B = torch.zeros(R, dims[sub][1])
                if sub in targets:
                    part = "self_attn" if sub in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                    a = sd[f"base_model.model.model.layers.{li}.{part}.{sub}.lora_A.weight"]
                    b = sd[f"base_model.model.model.layers.{li}.{part}.{sub}.lora_B.weight"] * 2.0   # alpha / r
                    A[:, j * R:j * R + r] = a.t()
                    B[:r] = b.t()
                    assert torch.equal(ad.weights[li][sub][0], a) and torch.equal(ad.weights[li][sub][1], b)
                assert torch.equal(st.B[ki][j][1], B), (li, sub)
                assert not st.B[ki][j][0].any()
            assert torch.equal(st.A[ki][1], A), (li, subs)
            assert not st.A[ki][0].any()
