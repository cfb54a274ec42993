"""The model catalogue: `switchyard.toml` (README, "A pool of models") as plain dataclasses.

    [stack]            optional StackConfig overrides (admin_tokens, tokens, ...; [stack.engine]: engine keys)
    [pool]             slots, slot_memory_gb, default_model, load_timeout_s
    [pool.scaler]      target_per_replica, scale_up_window_s, scale_down_window_s, idle_to_zero_s, interval_s
    [[models]]         name, source, version, capabilities, max_context, min_replicas, max_replicas,
                       memory_gb, gpu_usd_per_hour, [models.versions] other version -> source,
                       [models.engine] this model's EngineConfig keys over the stack's (dtype, ...)
    [[adapters]]       name, base, path, capabilities: a LoRA adapter (PEFT folder; relative paths are
                       relative to the catalogue file) served on the replicas of catalogue model `base`
    [[intents]]        capability, keywords, regex

Unknown keys are errors (a typo must not silently fall back to a default). Used by the launcher's
PoolManager (services/pool.py) and by the router (router/catalog_routing.py, router/intent.py).
"""
from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from common.config import engine_config_from, split_engine_keys

SOURCES_ENV = "SWITCHYARD_MODEL_SOURCES_FILE"   # served name -> source map for tokenizer lookups
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,47}$")


@dataclass
class ModelSpec:
    name: str
    source: str                               # built-in name, HF folder, .gguf file, random:<shape>
    version: str = "v1"
    capabilities: list[str] = field(default_factory=list)
    max_context: int = 2048
    min_replicas: int = 0
    max_replicas: int = 1
    memory_gb: float = 0.5                    # per replica: weights + KV cache estimate
    gpu_usd_per_hour: float = 2.5
    versions: dict[str, str] = field(default_factory=dict)   # other versions: version -> source
    engine: dict = field(default_factory=dict)   # EngineConfig keys for this model's replicas (over [stack])

    def source_for(self, version: str, override: str = "") -> str:
        return override or self.versions.get(version) or self.source


@dataclass
class AdapterSpec:
    name: str
    base: str                                 # a catalogue model name
    path: str                                 # PEFT folder: adapter_config.json + adapter_model.safetensors
    capabilities: list[str] = field(default_factory=list)


@dataclass
class ScalerSpec:
    target_per_replica: float = 4.0           # waiting + running requests one replica should carry
    scale_up_window_s: float = 1.0            # desired > actual this long before adding a replica
    scale_down_window_s: float = 15.0         # desired < actual this long before removing one
    idle_to_zero_s: float = 120.0             # no work this long: scale a min_replicas=0 model to zero
    interval_s: float = 0.5
    enabled: bool = True


@dataclass
class PoolSpec:
    slots: int = 2                            # worker slots (GPUs on a real host)
    slot_memory_gb: float = 16.0              # memory budget per slot
    default_model: str = ""
    load_timeout_s: float = 240.0
    max_imbalance: int = 8                    # router: a replica may carry at most this many more requests
                                              # than the least loaded one, whatever its prefix overlap
    intent_classifier: str = ""               # "module:factory" (factory(catalog) -> classifier); "" = rules
    scaler: ScalerSpec = field(default_factory=ScalerSpec)


@dataclass
class IntentRule:
    capability: str
    keywords: list[str] = field(default_factory=list)
    regex: list[str] = field(default_factory=list)


@dataclass
class Catalog:
    models: list[ModelSpec]
    pool: PoolSpec = field(default_factory=PoolSpec)
    intents: list[IntentRule] = field(default_factory=list)
    stack: dict = field(default_factory=dict)   # StackConfig overrides
    path: str = ""
    adapters: list[AdapterSpec] = field(default_factory=list)

    def adapter(self, name: str) -> AdapterSpec | None:
        return next((a for a in self.adapters if a.name == name), None)

    def get(self, name: str) -> ModelSpec | None:
        return next((m for m in self.models if m.name == name), None)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    @property
    def default_model(self) -> str:
        return self.pool.default_model or self.models[0].name

    def to_dict(self) -> dict:
        return asdict(self)


def served_name(name: str, version: str) -> str:
    """The model name a replica's heartbeats carry: <name>@<version>."""
    return f"{name}@{version}"


def split_served(served: str) -> tuple[str, str]:
    name, _, version = served.partition("@")
    return name, version


def _check_keys(data: dict, cls, where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")


def parse_catalog(data: dict, path: str = "") -> Catalog:
    _check_keys(data, Catalog, path or "catalogue")
    models = []
    for i, m in enumerate(data.get("models", [])):
        _check_keys(m, ModelSpec, f"models[{i}]")
        spec = ModelSpec(**m)
        if not _NAME.match(spec.name):
            raise ValueError(f"models[{i}].name {spec.name!r}: use [A-Za-z0-9_.-], at most 48 characters")
        if not 0 <= spec.min_replicas <= spec.max_replicas or spec.max_replicas < 1:
            raise ValueError(f"models[{i}] {spec.name}: need 0 <= min_replicas <= max_replicas, max_replicas >= 1")
        if spec.memory_gb <= 0 or spec.max_context < 2:
            raise ValueError(f"models[{i}] {spec.name}: memory_gb must be > 0 and max_context >= 2")
        engine_config_from(spec.engine, f"models[{i}].engine")   # unknown keys, bad dtype: fail at load
        models.append(spec)
    if not models:
        raise ValueError(f"{path or 'catalogue'}: no [[models]]")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate model names in {names}")
    pool_d = dict(data.get("pool", {}))
    scaler_d = pool_d.pop("scaler", {})
    _check_keys(pool_d, PoolSpec, "[pool]")
    _check_keys(scaler_d, ScalerSpec, "[pool.scaler]")
    pool = PoolSpec(**pool_d, scaler=ScalerSpec(**scaler_d))
    if pool.default_model and pool.default_model not in names:
        raise ValueError(f"[pool].default_model {pool.default_model!r} is not one of {names}")
    for m in models:
        if m.memory_gb > pool.slot_memory_gb:
            raise ValueError(f"model {m.name}: memory_gb {m.memory_gb} exceeds slot_memory_gb {pool.slot_memory_gb}")
    intents = []
    for i, r in enumerate(data.get("intents", [])):
        _check_keys(r, IntentRule, f"intents[{i}]")
        rule = IntentRule(**r)
        for rx in rule.regex:
            re.compile(rx)   # fail at load, not per request
        intents.append(rule)
    stack = dict(data.get("stack", {}))
    split_engine_keys(stack, "[stack]")   # unknown keys: fail at load
    adapters = _parse_adapters(data.get("adapters", []), names, Path(path).parent if path else Path.cwd())
    return Catalog(models, pool, intents, stack, str(path), adapters)


def _parse_adapters(items: list, model_names: list[str], root: Path) -> list[AdapterSpec]:
    out: list[AdapterSpec] = []
    for i, a in enumerate(items):
        _check_keys(a, AdapterSpec, f"adapters[{i}]")
        missing = [k for k in ("name", "base", "path") if not a.get(k)]
        if missing:
            raise ValueError(f"adapters[{i}]: {', '.join(missing)} required")
        spec = AdapterSpec(**a)
        if not _NAME.match(spec.name):
            raise ValueError(f"adapters[{i}].name {spec.name!r}: use [A-Za-z0-9_.-], at most 48 characters")
        if spec.name in model_names or any(o.name == spec.name for o in out):
            raise ValueError(f"adapters[{i}].name {spec.name!r} is already a model or adapter name")
        if spec.base not in model_names:
            raise ValueError(f"adapters[{i}] {spec.name}: base {spec.base!r} is not one of the models {model_names}")
        p = Path(spec.path).expanduser()
        p = p if p.is_absolute() else (root / p)
        if not (p / "adapter_config.json").is_file():
            raise ValueError(f"adapters[{i}] {spec.name}: {str(p)!r} is not a PEFT adapter folder "
                             f"(no adapter_config.json)")
        spec.path = str(p.resolve())
        spec.capabilities = [c.strip().lower() for c in spec.capabilities if c.strip()]
        out.append(spec)
    return out


def load_catalog(path: str | Path) -> Catalog:
    p = Path(path)
    text = p.read_text()
    data = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    return parse_catalog(data, str(p))


# ---- served name -> source (tokenizer lookups in the router and batchers) ----------------------
def write_sources(path: str | Path, sources: dict[str, str]) -> None:
    p = Path(path)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(sources, indent=1))
    os.replace(tmp, p)


def source_of(name: str) -> str:
    """The source behind a served or catalogue name, from $SWITCHYARD_MODEL_SOURCES_FILE; else name."""
    path = os.environ.get(SOURCES_ENV)
    if not path:
        return name
    try:
        return json.loads(Path(path).read_text()).get(name, name)
    except (OSError, ValueError):
        return name
