"""Stack configuration: StackConfig, loaded from TOML or JSON (`switchyard up --config`).

One configuration for every process. Stack-wide keys sit at the top level; the engine's settings are
one `EngineConfig` (workers/engine/config.py, the one set of engine defaults) under `[engine]`:

    workers = 2
    [engine]
    dtype = "bfloat16"
    max_num_seqs = 128

The launcher writes the resolved config as JSON and passes that one file to every child (`--config`);
a worker's engine config is `cfg.engine` as a whole (workers/main.py `engine_config`). The batcher
and router read the engine keys they share with the worker (block_size, max_num_seqs, max_waiting,
...) from the same `cfg.engine`. A few engine keys are still accepted at the top level, as aliases
from before `[engine]` existed (ENGINE_ALIASES); any other engine key there is an error naming [engine].

Port 0 means "pick a free one". Only the router has a fixed default port (50051, where clients look
for it); NATS, the KV index and the workers default to free ports, so two stacks run side by side on
one machine. `switchyard up` has a flag for each (--port, --nats-port, --kv-index-port,
--worker-base-port, --pool-control-port, --triton-port); stack.json records the ports picked.
`switchyard up --print-config` prints the effective configuration and exits.
"""
from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from workers.engine.config import EngineConfig

DEFAULT_ROUTER_PORT = 50051
DEFAULT_MODEL = "smollm2-135m"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # gRPC send/receive limit on every server and channel
NATS_MAX_PAYLOAD = 8 * 1024 * 1024    # a prompt of 128k token ids is ~0.5 MB as varints
MAX_REQUEST_BYTES = 8 * 1024 * 1024   # router: one request as received (a long-context prompt is well under)

# Engine keys also accepted at the top level of a config file or a [stack] table (same meaning as
# under [engine]): the flat keys configs, tests and deploy files used before [engine] existed.
ENGINE_ALIASES = ("device", "num_kv_blocks", "block_size", "max_num_seqs", "max_model_len", "max_waiting",
                  "lora_adapters", "max_loras", "max_lora_rank")
ENGINE_KEYS = tuple(f.name for f in fields(EngineConfig))

# routing_policy values (the policies themselves: router/routing.py). kv: prefix overlap + load (DESIGN's
# cost); least_loaded and round_robin: the baselines `switchyard bench compare --routing` measures it against.
KV, LEAST_LOADED, ROUND_ROBIN = "kv", "least_loaded", "round_robin"
POLICIES = (KV, LEAST_LOADED, ROUND_ROBIN)


def normalize_policy(name: str) -> str:
    """'round-robin' / 'Round_Robin' -> 'round_robin'; 'kv-aware' -> 'kv'."""
    n = str(name).strip().lower().replace("-", "_")
    return KV if n in ("kv_aware", "kv_locality") else n


@dataclass
class StackConfig:
    host: str = "127.0.0.1"
    router_port: int = DEFAULT_ROUTER_PORT
    nats_port: int = 0                   # 0: a free port (`--nats-port`)
    kv_manager_port: int = 0             # the KV index service; 0: a free port (`--kv-index-port`)
    worker_base_port: int = 0            # worker i: worker_base_port + i; 0: free ports (`--worker-base-port`)
    workers: int = 1
    model: str = DEFAULT_MODEL
    # engine / batching, per worker: every EngineConfig field (`[engine]`; workers/engine/config.py).
    # The batcher plans with the same block_size, max_num_seqs, max_num_batched_tokens, max_waiting,
    # max_loras and enable_prefix_caching; engine.num_threads None: the machine's cores / workers.
    engine: EngineConfig = field(default_factory=EngineConfig)
    admission_window_ms: float = 3.0     # idle batcher: gather arrivals closer than this into one step
    step_pipeline: bool = True           # plan step N+1 while the worker runs step N (batcher/step_timing.py)
    # external engines (workers/backends/): "switchyard" runs our engine; "triton" / "tensorrt-llm"
    # run a pass-through batcher per worker (batcher/passthrough.py) that relays to that engine
    backend: str = "switchyard"          # switchyard | triton | tensorrt-llm
    backend_url: str = ""                # triton: host:port of its gRPC endpoint
    backend_model: str = ""              # the model's name on the backend (default: model)
    backend_max_concurrency: int = 8     # requests relayed at once per worker; the rest wait by priority
    triton_port: int | None = None       # also serve the Triton gRPC protocol here (0: a free port)
    # routing
    routing_policy: str = "kv"           # kv (prefix overlap + load) | least_loaded | round_robin
    overlap_weight: float = 1.0
    load_weight: float = 1.0
    # liveness and shutdown
    heartbeat_interval_s: float = 0.5
    worker_timeout_s: float = 2.5        # a batcher silent this long is dropped (+ a 0.25 s sweep: < 3 s)
    drain_grace_s: float = 30.0          # in-flight streams get this long to finish on SIGTERM
    startup_timeout_s: float = 180.0
    max_message_bytes: int = MAX_MESSAGE_BYTES
    nats_max_payload: int = NATS_MAX_PAYLOAD
    # limits checked at the router before any work (router/validation.py check_limits; INVALID_ARGUMENT
    # naming the key and the value). Requests larger than max_message_bytes never reach the servicer.
    max_request_bytes: int = MAX_REQUEST_BYTES   # a Generate/Tokenize request as received, before decoding
    max_prompt_chars: int = 0            # prompt (or all messages' content); 0: context x prompt_chars_per_token
    prompt_chars_per_token: int = 16     # generous: real text runs ~4 characters a token
    max_prompt_tokens: int = 0           # 0: the model's context - 1 (at least one token to generate)
    max_stop_strings: int = 64           # sampling.stop: how many strings
    max_stop_bytes: int = 64 * 1024      # sampling.stop: their UTF-8 bytes together
    max_stop_token_ids: int = 1024       # sampling.stop_token_ids: how many (each in [0, vocab size))
    log_level: str = "warning"
    # telemetry (telemetry/): tracing is off unless an OTLP endpoint or a trace file is set
    otlp_endpoint: str = ""              # e.g. http://localhost:4317 (else OTEL_EXPORTER_OTLP_ENDPOINT)
    trace_file: str = ""                 # OTLP JSON lines (`switchyard up --trace-file`)
    trace_sample_ratio: float = 1.0      # parent-based: a sampled client trace is always continued
    gpu_usd_per_hour: float = 2.50       # USD per GPU-hour of a worker (cost metrics, Usage.cost_usd, bench serve)
    gpu_usd_per_hour_by_worker: dict | None = None   # worker id -> USD/h, overrides gpu_usd_per_hour
    # model pool (services/pool.py): a switchyard.toml catalogue; "" = one model (`model`) as before
    pool_config: str = ""
    pool_control_port: int = 0           # the launcher's internal switchyard.v1.Pool service (0: a free port)
    pool_load_wait_s: float = 180.0      # a request for an unloaded model waits this long (or its deadline)
    admin_tokens: list | None = None     # `authorization: Bearer <t>` for Admin/LoadModel, UnloadModel
    tokens: list | None = None           # non-admin tokens (PERMISSION_DENIED on admin calls)
    # -- faults (issue 16): liveness, migration, admission
    # liveness (batcher/liveness.py): a worker step running longer than factor x its predicted time
    # (batcher/step_timing.py) + floor marks the replica unhealthy, its streams migrate, the pair restarts
    step_timeout_factor: float = 5.0
    step_timeout_floor_s: float = 1.0    # (+ 0.5 s grace: a decode step of 0.1 s is called hung after 2 s)
    step_timeout_cold_s: float = 120.0   # a step before any was measured (first prefill, compilation)
    migration_limit: int = 2             # a stream moves to another replica at most this often (0: off)
    # honest admission (batcher/scheduler.py): an interactive request whose predicted wait for a first
    # token (measured prefill rate, step time, the queue ahead) exceeds this is refused at once with
    # RESOURCE_EXHAUSTED + a measured retry-after. 30 s: far above a healthy queue's wait even on CPU
    # (no normal load is refused), far below the minutes an overloaded one built up; 0: deadlines only.
    max_queue_delay_ms: float = 30000.0
    # -- tenants, quotas, fair shares, service classes (issue 17)
    # auth "off": every caller is tenant `default` (a known tenant token still names its tenant);
    # "required": every front-door RPC needs `authorization: Bearer <tenant token>` (router/tenants.py).
    auth: str = "off"                    # off | required
    # tenant name -> table: tokens (plain or "sha256:<hex>"), revoked_tokens, weight, service_classes,
    # default_class, tokens_per_minute, max_streams, max_queued, max_tokens, models, adapters,
    # priority_ceiling, cert_subjects (router/tenants.py TENANT_KEYS; 0 / empty: no limit)
    tenants: dict | None = None
    quota_shared: bool = True            # quotas across router replicas through NATS JetStream KV
    api_usd_per_1m_input: float = 0.15   # API list prices the per-tenant cost is compared with
    api_usd_per_1m_output: float = 0.60
    # -- TLS and NATS credentials (issue 17)
    # tls: TLS on every hop (common/tls.py): front doors, service-to-service gRPC (mutual, one internal
    # CA), NATS (TLS + a user per service). Files from `switchyard certs --out DIR` in tls_dir;
    # `switchyard up --tls` makes them in <workdir>/tls when tls_dir is "".
    tls: bool = False
    tls_dir: str = ""                    # ca.pem, <service>.pem / -key.pem, nats-users.json
    tls_cert: str = ""                   # front door certificate / key (PEM); "": <tls_dir>/<service>.pem
    tls_key: str = ""
    tls_ca: str = ""                     # the internal CA; "": <tls_dir>/ca.pem
    tls_client_ca: str = ""              # tenants' client certificates chain to this (or to the internal CA)
    tls_client_auth: str = "none"        # front doors: none | required (mTLS; subject -> tenant)
    # -- deployment profiles and defaults from the machine (issue 19)
    # Measure, at worker 0's start, the keys still at their defaults: engine.num_threads,
    # engine.max_num_batched_tokens (also the prefill chunk size) and admission_window_ms (workers/tuning.py).
    # None: on for `switchyard up`, off for stacks that tests and benchmarks start (they set it to measure).
    auto_tune: bool | None = None
    # the tuned token budget keeps a step under this: ITL p99 is a step carrying a prefill chunk, and the
    # goal is 100 ms (30 left for the stack and jitter); lower costs TTFT (a long prompt takes more chunks)
    tune_step_target_ms: float = 70.0
    # -- bulk jobs, embeddings, the OpenAI-compatible HTTP front door (issue 20)
    # embeddings (batcher/embedding_batcher.py): `embedding_workers` extra batcher+worker pairs (ids e0, e1, ...)
    # serve `embedding_model` for Inference/Embed; 0 workers or "" model: none
    embedding_model: str = "all-minilm-l6-v2"
    embedding_workers: int = 0           # `switchyard up --embedding-workers N`; `make run` starts 1
    embedding_max_texts: int = 2048      # texts in one Embed request (OpenAI's input limit)
    embedding_batch_tokens: int = 8192   # tokens of one packed forward (texts of many requests together)
    embedding_num_threads: int = 0       # torch threads of an embedding worker; 0: the machine's cores / 2
    http_port: int | None = None         # OpenAI-compatible HTTP front door (services/openai_http.py); 0: free
    http_files_dir: str = ""             # its uploaded /v1/files ("": <workdir>/openai-files)
    batch_max_file_bytes: int = 32 * 1024 * 1024   # a bulk job's JSONL input (Batch/CreateJob, /v1/files)
    batch_max_items: int = 50000         # items in one job
    batch_concurrency: int = 8           # items the router's runner runs at once (service class "batch")
    batch_concurrency_under_load: int = 2   # ... while interactive streams are open (0: batch_concurrency)
    batch_max_deliver: int = 5           # attempts per item before its dead-letter record
    batch_ack_wait_s: float = 30.0       # JetStream redelivers an item unacknowledged this long (runner died)
    batch_item_timeout_s: float = 300.0  # deadline of one item's Generate/Embed

    def __post_init__(self) -> None:
        if isinstance(self.engine, dict):   # StackConfig(**json.load(f)): the [engine] table as a dict
            self.engine = engine_config_from(self.engine)
        self.routing_policy = normalize_policy(self.routing_policy)
        if self.routing_policy not in POLICIES:
            raise ValueError(f"routing_policy {self.routing_policy!r}: choose one of {', '.join(POLICIES)}")

    def gpu_price(self, worker_id: str) -> float:
        """USD per GPU-hour of a worker: its gpu_usd_per_hour_by_worker entry, else gpu_usd_per_hour."""
        return float((self.gpu_usd_per_hour_by_worker or {}).get(worker_id, self.gpu_usd_per_hour))

    @property
    def nats_url(self) -> str:
        return f"nats://{self.host}:{self.nats_port}"

    @property
    def router_address(self) -> str:
        return f"{self.host}:{self.router_port}"

    @property
    def kv_manager_address(self) -> str:
        return f"{self.host}:{self.kv_manager_port}"

    def to_dict(self) -> dict:
        return asdict(self)


def engine_config_from(data: dict, where: str = "[engine]") -> EngineConfig:
    """An EngineConfig from a dict of its fields (unknown keys are an error)."""
    unknown = sorted(set(data) - set(ENGINE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown engine keys {unknown}; known: {sorted(ENGINE_KEYS)}")
    return EngineConfig(**data)


def split_engine_keys(data: dict, where: str) -> tuple[dict, dict]:
    """A config dict -> (stack keys, engine keys). Engine keys are the `engine` table plus the flat
    aliases (ENGINE_ALIASES); unknown keys, an engine key written flat that is not an alias, and a
    key given both ways are errors (a typo must not silently fall back to a default)."""
    data = dict(data)
    engine = data.pop("engine", None) or {}
    engine = asdict(engine) if isinstance(engine, EngineConfig) else dict(engine)
    for k in ENGINE_ALIASES:
        if k in data:
            if k in engine:
                raise ValueError(f"{where}: {k} is set both at the top level and under [engine]; keep one")
            engine[k] = data.pop(k)
    misplaced = sorted(set(data) & set(ENGINE_KEYS))
    if misplaced:
        raise ValueError(f"{where}: {misplaced} are engine settings: put them under [engine]")
    known = {f.name for f in fields(StackConfig)} - {"engine"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown config keys {unknown}; known: {sorted(known)} and [engine] "
                         f"{sorted(ENGINE_KEYS)}")
    bad = sorted(set(engine) - set(ENGINE_KEYS))
    if bad:
        raise ValueError(f"{where}: unknown engine keys {bad}; known: {sorted(ENGINE_KEYS)}")
    return data, engine


def read_config_file(path: str | Path) -> dict:
    p = Path(path)
    text = p.read_text()
    return json.loads(text) if p.suffix == ".json" else tomllib.loads(text)


def load_config(path: str | Path | None = None, *, engine: dict | None = None, **overrides) -> StackConfig:
    """Read a TOML or JSON file; then `overrides` (stack keys or engine aliases) and `engine` (engine
    keys) win over the file, each only where its value is not None (a flag that was not given)."""
    stack_d, engine_d = split_engine_keys(read_config_file(path), str(path)) if path is not None else ({}, {})
    given = {k: v for k, v in overrides.items() if v is not None}
    given_engine = {k: v for k, v in (engine or {}).items() if v is not None}
    over_stack, over_engine = split_engine_keys({**given, "engine": given_engine}, "overrides")
    stack_d.update(over_stack)
    engine_d.update(over_engine)
    return StackConfig(**stack_d, engine=engine_config_from(engine_d))


def write_config(cfg: StackConfig, path: str | Path) -> Path:
    """Write cfg as JSON (what the launcher hands its children: one file, the engine config whole)."""
    p = Path(path)
    p.write_text(json.dumps(cfg.to_dict(), indent=1))
    return p


def render_config(cfg: StackConfig, fmt: str = "toml") -> str:
    """The whole configuration as TOML or JSON text that load_config reads back to an equal StackConfig
    (`switchyard up --print-config`)."""
    if fmt == "json":
        return json.dumps(cfg.to_dict(), indent=1)
    return to_toml(cfg.to_dict())


def to_toml(d: dict) -> str:
    """A config dict as TOML: scalars and arrays first, then one table per dict. None has no TOML
    form: such a key is written as a comment and reads back as its default (every such default is None)."""
    lines: list[str] = []
    _toml_table(d, [], lines)
    return "\n".join(lines).strip() + "\n"


def _toml_table(d: dict, path: list[str], lines: list[str]) -> None:
    if path:
        lines += ["", "[" + ".".join(_toml_key(p) for p in path) + "]"]
    for k, v in d.items():
        if v is None:
            lines.append(f"# {_toml_key(k)}: not set")
        elif not isinstance(v, dict):
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    for k, v in d.items():
        if isinstance(v, dict):
            _toml_table(v, [*path, k], lines)


def _toml_key(k: str) -> str:
    return k if k and all(c.isalnum() or c in "_-" for c in k) and k.isascii() else json.dumps(k)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)   # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {type(v).__name__} {v!r}")
