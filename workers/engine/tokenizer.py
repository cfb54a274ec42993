"""Tokenizer: a `tokenizers.Tokenizer` plus the HF special-token and chat-template conventions."""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any


def _token_content(tok) -> str | None:
    if tok is None:
        return None
    if isinstance(tok, dict):
        return tok.get("content")
    return str(tok)


def _as_list(v) -> list[int]:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v]
    return [int(v)]


def _clean_up_tokenization(s: str) -> str:
    # transformers' PreTrainedTokenizerBase.clean_up_tokenization
    return (s.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",")
            .replace(" ' ", "'").replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s")
            .replace(" 've", "'ve").replace(" 're", "'re"))


@lru_cache(maxsize=32)
def _compile_template(source: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        from jinja2.exceptions import TemplateError
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer`; behaves like HF `AutoTokenizer` for encode/decode/chat templates."""

    def __init__(self, backend, tokenizer_config: dict | None = None, generation_config: dict | None = None,
                 model_config: dict | None = None):
        self._tk = backend
        # decode() of one token id, memoised: the incremental detokenizer decodes the previous
        # token alone once per request per step (its prefix window). Same input, same output.
        self._single: dict[tuple[int, bool], str] = {}
        cfg = dict(tokenizer_config or {})
        self.config = cfg
        self.bos_token = _token_content(cfg.get("bos_token"))
        self.eos_token = _token_content(cfg.get("eos_token"))
        self.pad_token = _token_content(cfg.get("pad_token"))
        self.unk_token = _token_content(cfg.get("unk_token"))
        self.add_bos_token = bool(cfg.get("add_bos_token", False))
        self.clean_up_tokenization_spaces = bool(cfg.get("clean_up_tokenization_spaces", False))
        tmpl = cfg.get("chat_template")
        if isinstance(tmpl, list):   # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in tmpl}
            tmpl = named.get("default") or next(iter(named.values()), None)
        self.chat_template: str | None = tmpl

        added = backend.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, a in added.items() if a.special)

        gen = generation_config or {}
        mcfg = model_config or {}
        self.bos_token_id: int | None = (self.token_to_id(self.bos_token) if self.bos_token else None)
        if self.bos_token_id is None:
            ids = _as_list(gen.get("bos_token_id")) or _as_list(mcfg.get("bos_token_id"))
            self.bos_token_id = ids[0] if ids else None
        eos: list[int] = []
        for i in ([self.token_to_id(self.eos_token)] if self.eos_token else []) + \
                _as_list(gen.get("eos_token_id")) + _as_list(mcfg.get("eos_token_id")):
            if i is not None and i not in eos:
                eos.append(i)
        self.eos_token_ids: list[int] = eos
        self.eos_token_id: int | None = eos[0] if eos else None
        self.pad_token_id: int | None = self.token_to_id(self.pad_token) if self.pad_token else None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        from tokenizers import Tokenizer as _Tk

        p = Path(path)
        backend = _Tk.from_file(str(p / "tokenizer.json"))

        def read(name):
            f = p / name
            return json.loads(f.read_text(encoding="utf-8")) if f.exists() else {}

        tok_cfg = read("tokenizer_config.json")
        if "chat_template" not in tok_cfg:
            if (p / "chat_template.jinja").exists():
                tok_cfg["chat_template"] = (p / "chat_template.jinja").read_text(encoding="utf-8")
            elif (p / "chat_template.json").exists():
                tok_cfg["chat_template"] = read("chat_template.json").get("chat_template")
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if key not in tok_cfg:
                sm = read("special_tokens_map.json")
                if key in sm:
                    tok_cfg[key] = sm[key]
        return cls(backend, tok_cfg, read("generation_config.json"), read("config.json"))

    # ------------------------------------------------------------------ API
    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (HF `len(tokenizer)`)."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def backend(self):
        return self._tk

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self._tk.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None \
                and (not ids or ids[0] != self.bos_token_id):
            # tokenizer.json without a post-processor that adds BOS, but the config asks for it
            ids = [self.bos_token_id] + ids
        return ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [self.encode(t, add_special_tokens) for t in texts]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if len(ids) == 1:
            key = (int(ids[0]), skip_special_tokens)
            s = self._single.get(key)
            if s is None:
                if len(self._single) >= 1 << 20:     # bounded: the vocabulary times two flags fits
                    self._single.clear()
                s = self._single[key] = self._decode(ids, skip_special_tokens)
            return s
        return self._decode(ids, skip_special_tokens)

    def _decode(self, ids, skip_special_tokens: bool) -> str:
        s = self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(s) if self.clean_up_tokenization_spaces else s

    def id_to_token(self, i: int) -> str | None:
        return self._tk.id_to_token(int(i))

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def is_special(self, i: int) -> bool:
        return int(i) in self._special_ids

    @property
    def special_token_ids(self) -> frozenset[int]:
        return self._special_ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            chat_template: str | None = None, **kwargs: Any) -> str:
        source = chat_template or self.chat_template
        if not source:
            raise ValueError("this tokenizer has no chat template")
        ctx = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
        }
        ctx.update(kwargs)
        return _compile_template(source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **ctx)
