"""Convert a llama.cpp GGUF file (Llama architecture) into a HF-layout folder, once, cached.

The folder holds `config.json`, `model.safetensors` (float32, HF tensor names, HF q/k layout),
`tokenizer.json`, `tokenizer_config.json` and `generation_config.json`, so both our loader and
`transformers` can read it. It is written into a temporary folder and renamed into place, so two
processes converting the same file at once cannot leave a half-written folder behind.

The cache (`~/.cache/switchyard/models/`, or `$SWITCHYARD_CACHE_DIR`) is keyed by the file's content
(SHA-256), so every clone and virtualenv holding the same GGUF shares one conversion (~635 MB for
SmolLM2-135M). The hash itself is remembered by (path, size, mtime) in `gguf-hashes.json` there, so a
file is hashed once, not on every load. The CPU block cache (`gguf_blocks.safetensors`,
block_weights.py) lives in the same folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

log = logging.getLogger("switchyard.engine.gguf")

CACHE_ENV = "SWITCHYARD_CACHE_DIR"
HASHES_FILE = "gguf-hashes.json"   # in cache_root(): "path|size|mtime_ns" -> the file's SHA-256
_HASH_CHUNK = 8 << 20

# llama.cpp token types (gguf.TokenType)
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 3, 4

# Pre-tokenizer splits by `tokenizer.ggml.pre` (as transformers' GGUF converter and llama.cpp use them).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def cache_root() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "switchyard" / "models"


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def content_hash(gguf_path: str | os.PathLike) -> str:
    """SHA-256 of the file, hashed in chunks once per (path, size, mtime) and remembered in
    `gguf-hashes.json` in the cache root (a 98 MB GGUF is not re-read on every load)."""
    p = Path(gguf_path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    index = cache_root() / HASHES_FILE
    known = _read_hashes(index)
    if key in known:
        return known[key]
    digest = _hash_file(p)
    known = _read_hashes(index)   # again: another process may have added entries meanwhile
    prefix = f"{p}|"
    known = {k: v for k, v in known.items() if not k.startswith(prefix) and Path(k.rsplit("|", 2)[0]).exists()}
    known[key] = digest
    try:
        index.parent.mkdir(parents=True, exist_ok=True)
        tmp = index.with_name(f".{index.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
        os.replace(tmp, index)
    except OSError:   # a read-only cache: hash again next time
        pass
    return digest


def _read_hashes(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def cache_dir_for(gguf_path: str | os.PathLike) -> Path:
    """The cache folder a GGUF file converts into, named by its content: the same for every copy."""
    return cache_root() / f"gguf-{content_hash(gguf_path)[:20]}"


def _legacy_cache_dir(gguf_path: str | os.PathLike) -> Path:
    """Where conversions were kept before the content key: stem + hash of (path, size, mtime)."""
    p = Path(gguf_path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()
    return cache_root() / f"{p.stem}-{hashlib.sha1(key).hexdigest()[:12]}"


def ensure_converted(gguf_path: str | os.PathLike) -> Path:
    """Return the HF-layout folder for `gguf_path`, converting it first if it is not cached yet."""
    final = cache_dir_for(gguf_path)
    if (final / "config.json").exists():
        return final
    legacy = _legacy_cache_dir(gguf_path)
    if (legacy / "config.json").exists():   # converted under the old key: the same content, move it
        try:
            os.rename(legacy, final)
            return final
        except OSError:
            if (final / "config.json").exists():   # another process moved it first
                return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        convert_gguf(gguf_path, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished first (the folder exists and is complete): use theirs.
            if not (final / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------------------------
# metadata

def _f32(v) -> float:
    """GGUF stores floats as float32: give back the short decimal HF configs carry (1e-05, not 9.99e-06)."""
    return float(str(np.float32(v)))


def _read_metadata(reader) -> dict:
    md = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            md[name] = field.contents()
        except Exception as e:  # noqa: BLE001 - gguf-py on a field type it cannot decode: skip that field
            log.debug("GGUF metadata field %s skipped: %r", name, e)
            continue
    return md


def _tensor_shape(t) -> tuple[int, ...]:
    # GGUF lists dimensions fastest-first; torch is the reverse.
    return tuple(int(x) for x in reversed(t.shape.tolist()))


def _llama3_rope_from_freqs(rope_freqs: np.ndarray, theta: float, head_dim: int) -> dict | None:
    """llama.cpp stores Llama 3.1's rope scaling as a `rope_freqs` factor tensor: recover the HF dict."""
    factor = float(rope_freqs[-1])
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    for orig in (8192, 4096, 16384, 32768):
        low, high = 1.0, 4.0
        wavelen = 2 * math.pi / inv
        smooth = (orig / wavelen - low) / (high - low)
        scaled = np.where(wavelen > orig / low, inv / factor, inv)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < orig / high) & ~(wavelen > orig / low)
        scaled = np.where(medium, smoothed, scaled)
        if np.allclose(inv / scaled, rope_freqs, rtol=1e-3):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": orig}
    return None


def gguf_hf_config(md: dict, arch: str, num_tokens: int) -> dict:
    def g(key, default=None):
        return md.get(f"{arch}.{key}", default)

    hidden = int(g("embedding_length"))
    heads = int(g("attention.head_count"))
    kv = g("attention.head_count_kv", heads)
    kv = int(kv if not isinstance(kv, list) else kv[0])
    head_dim = int(g("attention.key_length", 0) or g("rope.dimension_count", 0) or hidden // heads)
    rope_scaling = None
    stype = g("rope.scaling.type")
    if stype == "linear" and g("rope.scaling.factor"):
        rope_scaling = {"rope_type": "linear", "factor": _f32(g("rope.scaling.factor"))}
    elif stype not in (None, "none", "linear"):
        raise ValueError(f"GGUF rope scaling type {stype!r} is not supported")
    tok = md.get
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "rms_norm_eps": _f32(g("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(g("rope.freq_base", 10000.0)),
        "rope_scaling": rope_scaling,
        "max_position_embeddings": int(g("context_length", 2048)),
        "vocab_size": int(g("vocab_size", num_tokens)),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": tok("tokenizer.ggml.bos_token_id"),
        "eos_token_id": tok("tokenizer.ggml.eos_token_id"),
        "pad_token_id": tok("tokenizer.ggml.padding_token_id"),
        "tie_word_embeddings": True,   # set from the tensors below
        "torch_dtype": "float32",
    }
    return cfg


# ----------------------------------------------------------------------------------------------
# tokenizer

def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_gguf_tokenizer(md: dict):
    """A `tokenizers.Tokenizer` (byte-level BPE) from GGUF tokenizer metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    model_type = md.get("tokenizer.ggml.model")
    if model_type != "gpt2":
        raise ValueError(f"GGUF tokenizer model {model_type!r} is not supported (only byte-level BPE 'gpt2')")
    tokens = list(md["tokenizer.ggml.tokens"])
    types = list(md.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens))
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for i, t in enumerate(tokens):
        key = t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))
        vocab.setdefault(key, i)
    merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges", [])]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                              fuse_unk=False, byte_fallback=False))
    pre = md.get("tokenizer.ggml.pre", "default")
    if pre == "smollm":
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    elif pre in _PRE_SPLITS:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
               if ty == _TOKEN_CONTROL and set(t) <= alphabet]
    if control:
        tk.add_special_tokens(control)
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types)
            if ty == _TOKEN_USER_DEFINED and t in vocab]
    if user:
        tk.add_tokens(user)
    return tk


def gguf_tokenizer_files(md: dict, max_len: int) -> tuple[object, dict, dict]:
    """(tokenizers.Tokenizer, tokenizer_config dict, generation_config dict) from GGUF metadata."""
    tk = build_gguf_tokenizer(md)
    tokens = md["tokenizer.ggml.tokens"]

    def name(key):
        i = md.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    added = {i: a for i, a in tk.get_added_tokens_decoder().items()}
    tok_cfg = {
        "add_bos_token": bool(md.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(md.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {"content": a.content, "lstrip": a.lstrip, "normalized": a.normalized,
                     "rstrip": a.rstrip, "single_word": a.single_word, "special": a.special}
            for i, a in sorted(added.items())
        },
        "bos_token": name("bos_token_id"),
        "eos_token": name("eos_token_id"),
        "pad_token": name("padding_token_id"),
        "unk_token": name("unknown_token_id"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if md.get("tokenizer.chat_template"):
        tok_cfg["chat_template"] = md["tokenizer.chat_template"]
    gen_cfg = {k: v for k, v in {
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": md.get("tokenizer.ggml.padding_token_id"),
    }.items() if v is not None}
    return tk, tok_cfg, gen_cfg


def tokenizer_from_gguf(gguf_path: str | os.PathLike):
    """Build only the tokenizer (no weights) from a GGUF: (tokenizers.Tokenizer, tokenizer_config, gen_config)."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    md = _read_metadata(reader)
    arch = md.get("general.architecture", "llama")
    return gguf_tokenizer_files(md, int(md.get(f"{arch}.context_length", 2048)))


# ----------------------------------------------------------------------------------------------
# weights

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def unpermute_qk_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its interleaved rope layout -> HF rotate_half layout)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name.startswith("blk."):
        _, idx, rest = gguf_name.split(".", 2)
        if rest in _LAYER_NAMES:
            return f"model.layers.{int(idx)}.{_LAYER_NAMES[rest]}"
    return None


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the HF-layout files for `gguf_path` into `out_dir` (no caching, no atomicity)."""
    import gguf
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(str(gguf_path))
    md = _read_metadata(reader)
    arch = md.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    cfg = gguf_hf_config(md, arch, len(md.get("tokenizer.ggml.tokens", [])))
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            freqs = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(-1)
            rs = _llama3_rope_from_freqs(freqs, cfg["rope_theta"], cfg["head_dim"])
            if rs is None:
                raise ValueError("GGUF rope_freqs tensor does not match llama3 rope scaling")
            cfg["rope_scaling"] = rs
            continue
        name = hf_name(t.name)
        if name is None:
            raise ValueError(f"unexpected GGUF tensor {t.name!r}")
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w = w.reshape(_tensor_shape(t))
        if ".attn_q." in t.name:
            w = unpermute_qk_rows(w, n_head)
        elif ".attn_k." in t.name:
            w = unpermute_qk_rows(w, n_kv)
        tensors[name] = torch.from_numpy(np.array(w, dtype=np.float32, order="C", copy=True))
    cfg["tie_word_embeddings"] = "lm_head.weight" not in tensors
    ordered = {k: tensors[k] for k in sorted(tensors, key=_write_order)}
    save_safetensors(ordered, out / "model.safetensors", metadata={"format": "pt"})
    del tensors

    tk, tok_cfg, gen_cfg = gguf_tokenizer_files(md, cfg["max_position_embeddings"])
    tk.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", tok_cfg)
    _write_json(out / "generation_config.json", gen_cfg)
    _write_json(out / "config.json", cfg)   # last: its presence marks a complete folder
    return out


_ORDER = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
          "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias", "self_attn.o_proj.weight",
          "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
          "input_layernorm.weight", "post_attention_layernorm.weight"]


def _write_order(name: str):
    """Layer by layer, q/k/v adjacent and gate/up adjacent, so the loader can fuse them as views."""
    if name == "model.embed_tokens.weight":
        return (0, 0, 0)
    if name.startswith("model.layers."):
        _, _, idx, rest = name.split(".", 3)
        return (1, int(idx), _ORDER.index(rest) if rest in _ORDER else len(_ORDER))
    return (2, 0, name)


_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
              "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write a .safetensors file keeping the dict's order in the data section (the stock writer sorts
    by name). The format allows any order; `safetensors`/transformers read it as usual."""
    import torch

    header: dict = {"__metadata__": dict(metadata or {})}
    off = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[str(t.dtype).replace("torch.", "")], "shape": list(t.shape),
                        "data_offsets": [off, off + nbytes]}
        off += nbytes
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for t in tensors.values():
            t = t.detach().contiguous().cpu()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
