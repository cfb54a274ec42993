"""Tests for workers/engine/detokenizer.py with a real byte-level BPE tokenizer."""
from __future__ import annotations

import random

import pytest

tokenizers = pytest.importorskip("tokenizers")

from workers.engine.detokenizer import IncrementalDetokenizer  # noqa: E402

CORPUS = [
    "Hello world, this is a small corpus for a tiny tokenizer.",
    "Café crème brûlée à la française, naïve façade, über schön.",
    "日本語のテキストと中文文本混合在一起。東京は大きい。",
    "Emoji: 😀 😃 🚀 🎉 👍🏽 ❤️ and more text after them.",
    "The quick brown fox jumps over the lazy dog. 1234567890!",
    "Señor Muñoz está en la ciudad de México; ¿qué tal?",
]
# characters for random texts; some (Ω, 🦀, 𝄞, 한) never appear in the corpus, so they
# fall back to single-byte tokens and span several tokens
CHARS = list("abcdefgh ijklmnop qrstuvwxyz ,.!?\n") + list("éèàüöñçß日本語中文東京") + \
    ["😀", "🚀", "🎉", "👍🏽", "❤️", "Ω", "🦀", "𝄞", "한", "€"]


class Tok:
    """decode(ids, skip_special_tokens) wrapper that counts decoded ids."""

    def __init__(self, tk):
        self.tk = tk
        self.decoded_ids = 0
        self.calls = 0

    def decode(self, ids, skip_special_tokens=True):
        self.calls += 1
        self.decoded_ids += len(ids)
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode(self, text):
        return self.tk.encode(text).ids


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS * 3, trainer=trainer)
    return Tok(tk)


def rand_text(rng, lo=1, hi=40):
    return "".join(rng.choice(CHARS) for _ in range(rng.randint(lo, hi)))


def run(det, ids, rng=None, max_chunk=1):
    """Feed ids in random-size chunks; return (chunks, stop_hit)."""
    chunks, i, hit = [], 0, False
    while i < len(ids):
        k = rng.randint(1, max_chunk) if rng else 1
        text, hit = det.add_tokens(ids[i:i + k])
        chunks.append(text)
        i += k
        if hit:
            break
    return chunks, hit


def test_tokenizer_splits_multibyte_chars(tok):
    for ch in ["🦀", "𝄞", "한", "Ω"]:
        ids = tok.encode(ch)
        assert len(ids) >= 2, ch
        assert tok.decode(ids[:1]).endswith("\ufffd")


def test_chunks_concatenate_to_full_decode(tok):
    rng = random.Random(1234)
    for trial in range(150):
        prompt = tok.encode(rand_text(rng, 0, 12))
        out = tok.encode(rand_text(rng))
        det = IncrementalDetokenizer(tok, prompt, stop=[])
        chunks, hit = run(det, out, rng, max_chunk=1 if trial % 2 else 4)
        assert not hit
        chunks.append(det.flush())
        for c in chunks:
            assert "\ufffd" not in c
        assert "".join(chunks) == tok.decode(out)
        assert det.output_text == tok.decode(out)


def test_chunks_with_unmatched_stops_concatenate(tok):
    rng = random.Random(99)
    for _ in range(80):
        out_text = rand_text(rng)
        out = tok.encode(out_text)
        det = IncrementalDetokenizer(tok, [], stop=["zzzq", "日本Ωx", "🚀🚀🚀"])
        chunks, hit = run(det, out, rng, max_chunk=3)
        assert not hit
        chunks.append(det.flush())
        assert all("\ufffd" not in c for c in chunks)
        assert "".join(chunks) == tok.decode(out) == out_text


def test_cost_does_not_grow_with_output(tok):
    rng = random.Random(5)
    out = tok.encode(rand_text(rng, 3000, 3000))
    det = IncrementalDetokenizer(tok, tok.encode("hello there"), stop=["STOP"])
    tok.decoded_ids = tok.calls = 0
    for tid in out:
        det.add_tokens([tid])
    assert det.flush() is not None
    # at most a small window per step, independent of position
    assert tok.decoded_ids / len(out) < 30
    assert det.output_text == tok.decode(out)
    assert len(det._ids) < 300


def test_leading_space_of_first_token(tok):
    prompt = tok.encode("Hello")
    out = tok.encode(" world")
    det = IncrementalDetokenizer(tok, prompt)
    text, _ = det.add_tokens(out)
    assert text + det.flush() == " world"


def test_stop_string_spanning_tokens_trimmed(tok):
    text = "Café crème 日本語 🚀 end of story and more"
    ids = tok.encode(text)
    det = IncrementalDetokenizer(tok, [], stop=["語 🚀 e"])
    emitted, hit = [], False
    for tid in ids:
        chunk, hit = det.add_tokens([tid])
        emitted.append(chunk)
        if hit:
            break
    assert hit
    assert "".join(emitted) == "Café crème 日本"
    assert det.output_text == "Café crème 日本"
    # nothing after the stop
    assert det.add_tokens(tok.encode(" more")) == ("", True)
    assert det.flush() == ""
    assert det.output_text == "Café crème 日本"


def test_stop_never_emitted_partially(tok):
    """Across random texts with an inserted stop string, no chunk ever leaks stop text."""
    rng = random.Random(77)
    stops = ["🎉Ωab", "\n\n", "東京c"]
    for _ in range(60):
        before = rand_text(rng).replace("\n\n", "\n")
        for s in stops:
            while s in before:
                before = before.replace(s, "")
        # make sure before + stop doesn't create an earlier match across the boundary
        stop = rng.choice(stops)
        full = before + stop + rand_text(rng)
        first = min((full.find(s) for s in stops if full.find(s) != -1))
        ids = tok.encode(full)
        det = IncrementalDetokenizer(tok, [], stop=stops)
        chunks, hit = run(det, ids, rng, max_chunk=3)
        assert hit
        assert "".join(chunks) == full[:first] == det.output_text
        assert all("\ufffd" not in c for c in chunks)


def test_held_text_released_on_flush(tok):
    det = IncrementalDetokenizer(tok, [], stop=["abcXYZ"])
    ids = tok.encode("hello abc")
    chunks = [det.add_tokens([t])[0] for t in ids]
    assert "".join(chunks) == "hello "          # 'abc' could begin the stop string
    assert det.flush() == "abc"
    assert det.output_text == "hello abc"
    assert det.add_tokens(tok.encode("XYZ")) == ("", False)   # finished: adds nothing


def test_hold_is_minimal(tok):
    det = IncrementalDetokenizer(tok, [], stop=["abcdef"])
    text, hit = det.add_tokens(tok.encode("hello wor"))
    assert (text, hit) == ("hello wor", False)   # no suffix of it begins the stop string


def test_earliest_stop_wins(tok):
    stops = ["d", "world", "o w"]          # the last-listed one occurs first
    det = IncrementalDetokenizer(tok, [], stop=stops)
    text, hit = det.add_tokens(tok.encode("Hello world"))
    assert hit and text == "Hell"
    det = IncrementalDetokenizer(tok, [], stop=["world", "lo w"])
    chunks, hit = run(det, tok.encode("Hello world"))
    assert hit and "".join(chunks) == "Hel"


def test_stop_inside_multibyte_sequence(tok):
    det = IncrementalDetokenizer(tok, tok.encode("prompt"), stop=["🦀"])
    ids = tok.encode("x 🦀 y")
    chunks, hit = run(det, ids)
    assert hit and "".join(chunks) == "x "


def test_flush_drops_trailing_partial_char(tok):
    ids = tok.encode("ab🦀")
    det = IncrementalDetokenizer(tok, [])
    chunks, _ = run(det, ids[:-1])
    assert "".join(chunks) == "ab"
    assert det.flush() == ""
    assert det.output_text == "ab"


def test_special_tokens_skipped(tok):
    eos = tok.tk.token_to_id("<|eos|>")
    ids = tok.encode("hi there") + [eos]
    det = IncrementalDetokenizer(tok, [])
    chunks, _ = run(det, ids)
    chunks.append(det.flush())
    assert "".join(chunks) == "hi there"
    det = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    chunks, _ = run(det, ids)
    chunks.append(det.flush())
    assert "".join(chunks) == "hi there<|eos|>"
