"""The model catalogue: `switchyard.toml` (README, "A pool of models") as plain dataclasses.

    [stack]            optional StackConfig overrides (admin_tokens, tokens, ...; [stack.engine]: engine keys)
    [pool]             slots, slot_memory_gb, default_model, load_timeout_s
    [pool.scaler]      target_per_replica, scale_up_window_s, scale_down_window_s, idle_to_zero_s, interval_s
    [[models]]         name, source, version, capabilities, max_context, min_replicas, max_replicas,
                       memory_gb, gpu_usd_per_hour, [models.versions] other version -> source,
                       [models.engine] this model's EngineConfig keys over the stack's (dtype, ...),
                       default_profile, [models.profiles.<name>] deployment profiles (below)
    [[adapters]]       name, base, path, capabilities: a LoRA adapter (PEFT folder; relative paths are
                       relative to the catalogue file) served on the replicas of catalogue model `base`
    [[intents]]        capability, keywords, regex

Deployment profiles: one model served by separate groups of replicas tuned differently, e.g.
`online` (few seats, small token budget: short steps, low ITL) and `offline` (many seats, large
budget: throughput). Each profile has its own replicas (min/max_replicas, memory_gb: the model's when
unset) and [engine] keys over the model's; the pool runs it as the deployment `<model>:<profile>`
(served as `<model>:<profile>@<version>`). A request picks one by `service_class` (a profile's
`service_classes`; `online` serves "interactive" and `offline` "batch" unless set) or names it
(`model = "smollm2:online"`); otherwise the model's `default_profile` (the interactive one, else the
first).

Unknown keys are errors (a typo must not silently fall back to a default). Used by the launcher's
PoolManager (services/pool.py) and by the router (router/catalog_routing.py, router/intent.py).
"""
from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from common.config import engine_config_from, split_engine_keys

SOURCES_ENV = "SWITCHYARD_MODEL_SOURCES_FILE"   # served name -> source map for tokenizer lookups
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,47}$")
_PROFILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,23}$")
SERVICE_CLASSES = ("interactive", "batch")      # GenerateRequest.service_class values
PROFILE_SEP = ":"                               # deployment name: <model>:<profile>
# A profile named like this serves that class unless its service_classes say otherwise.
DEFAULT_PROFILE_CLASSES = {"online": ["interactive"], "offline": ["batch"]}


@dataclass
class ProfileSpec:
    """One deployment profile of a model: its own replicas and engine keys (over the model's)."""
    service_classes: list[str] | None = None  # None: DEFAULT_PROFILE_CLASSES by name, else none
    min_replicas: int | None = None           # None: the model's
    max_replicas: int | None = None
    memory_gb: float | None = None
    engine: dict = field(default_factory=dict)


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
    profiles: dict[str, ProfileSpec] = field(default_factory=dict)   # deployment profiles (module doc)
    default_profile: str = ""                 # "": the profile serving "interactive", else the first

    def source_for(self, version: str, override: str = "") -> str:
        return override or self.versions.get(version) or self.source

    def profile_for(self, service_class: str) -> tuple[str, str]:
        """-> (profile, why) for a request of this service class ("" when the model has no profiles)."""
        if not self.profiles:
            return "", ""
        for name, p in self.profiles.items():
            if service_class and service_class in (p.service_classes or []):
                return name, f"profile {name!r} serves service class {service_class!r}"
        what = f"no profile serves service class {service_class!r}" if service_class else "no service class"
        return self.default_profile, f"profile {self.default_profile!r} ({what}: the model's default)"

    def deployment(self, profile: str) -> "ModelSpec":
        """The spec the pool runs for one profile: named <model>:<profile>, the profile's replicas and
        engine keys over the model's, no profiles of its own."""
        p = self.profiles[profile]
        return replace(self, name=f"{self.name}{PROFILE_SEP}{profile}",
                       min_replicas=self.min_replicas if p.min_replicas is None else p.min_replicas,
                       max_replicas=self.max_replicas if p.max_replicas is None else p.max_replicas,
                       memory_gb=self.memory_gb if p.memory_gb is None else p.memory_gb,
                       engine={**self.engine, **p.engine}, profiles={}, default_profile="")


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

    def deployments(self) -> list[ModelSpec]:
        """What the pool runs: each model without profiles as is, each profile as `<model>:<profile>`."""
        return [m.deployment(p) for m in self.models for p in m.profiles] + [m for m in self.models if not m.profiles]

    def deployment(self, name: str) -> ModelSpec | None:
        """The spec of a deployment name (`model` without profiles, or `model:profile`); None if unknown."""
        model, profile = split_profile(name)
        m = self.get(model)
        if m is None or bool(profile) != bool(m.profiles) or (profile and profile not in m.profiles):
            return None
        return m.deployment(profile) if profile else m

    def deployment_names(self, model: str) -> list[str]:
        """A catalogue model's deployment names: its profiles', or its own."""
        m = self.get(model)
        if m is None:
            return []
        return [f"{model}{PROFILE_SEP}{p}" for p in m.profiles] or [model]

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


def split_profile(name: str) -> tuple[str, str]:
    """'smollm2:online' -> ('smollm2', 'online'); 'smollm2' -> ('smollm2', '')."""
    model, _, profile = name.partition(PROFILE_SEP)
    return model, profile


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
        m = dict(m)
        profiles = _parse_profiles(m.pop("profiles", {}), f"models[{i}]")
        spec = ModelSpec(**m, profiles=profiles)
        if not _NAME.match(spec.name):
            raise ValueError(f"models[{i}].name {spec.name!r}: use [A-Za-z0-9_.-], at most 48 characters")
        if not 0 <= spec.min_replicas <= spec.max_replicas or spec.max_replicas < 1:
            raise ValueError(f"models[{i}] {spec.name}: need 0 <= min_replicas <= max_replicas, max_replicas >= 1")
        if spec.memory_gb <= 0 or spec.max_context < 2:
            raise ValueError(f"models[{i}] {spec.name}: memory_gb must be > 0 and max_context >= 2")
        engine_config_from(spec.engine, f"models[{i}].engine")   # unknown keys, bad dtype: fail at load
        _check_profiles(spec, f"models[{i}] {spec.name}")
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
        for d in [m, *(m.deployment(p) for p in m.profiles)]:
            if d.memory_gb > pool.slot_memory_gb:
                raise ValueError(f"model {d.name}: memory_gb {d.memory_gb} exceeds slot_memory_gb "
                                 f"{pool.slot_memory_gb}")
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


def _parse_profiles(data: dict, where: str) -> dict[str, ProfileSpec]:
    if not isinstance(data, dict):
        raise ValueError(f"{where}.profiles: a table of profile name -> settings ([models.profiles.online])")
    out: dict[str, ProfileSpec] = {}
    for name, p in data.items():
        at = f"{where}.profiles.{name}"
        if not _PROFILE.match(name):
            raise ValueError(f"{at}: profile names use [A-Za-z0-9_-], at most 24 characters (e.g. online, offline)")
        if not isinstance(p, dict):
            raise ValueError(f"{at}: a table of profile settings")
        _check_keys(p, ProfileSpec, at)
        spec = ProfileSpec(**p)
        if spec.service_classes is None:
            spec.service_classes = list(DEFAULT_PROFILE_CLASSES.get(name, []))
        bad = [c for c in spec.service_classes if c not in SERVICE_CLASSES]
        if bad:
            raise ValueError(f"{at}.service_classes {bad}: choose from {list(SERVICE_CLASSES)}")
        engine_config_from(spec.engine, f"{at}.engine")
        out[name] = spec
    return out


def _check_profiles(spec: ModelSpec, where: str) -> None:
    if not spec.profiles:
        if spec.default_profile:
            raise ValueError(f"{where}: default_profile {spec.default_profile!r} but no [models.profiles]")
        return
    claimed: dict[str, str] = {}
    for name, p in spec.profiles.items():
        for c in p.service_classes or []:
            if c in claimed:
                raise ValueError(f"{where}: service class {c!r} is served by both profiles {claimed[c]!r} and "
                                 f"{name!r}; give each class one profile")
            claimed[c] = name
        d = spec.deployment(name)
        if not 0 <= d.min_replicas <= d.max_replicas or d.max_replicas < 1:
            raise ValueError(f"{where}.profiles.{name}: need 0 <= min_replicas <= max_replicas, max_replicas >= 1")
        if d.memory_gb <= 0:
            raise ValueError(f"{where}.profiles.{name}: memory_gb must be > 0")
    if spec.default_profile and spec.default_profile not in spec.profiles:
        raise ValueError(f"{where}: default_profile {spec.default_profile!r} is not one of its profiles "
                         f"{sorted(spec.profiles)}")
    spec.default_profile = spec.default_profile or claimed.get("interactive") or next(iter(spec.profiles))


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
