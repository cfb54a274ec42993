"""Stack configuration: one flat dataclass, loaded from TOML or JSON (`switchyard up --config`).

Port 0 means "pick a free one". Only the router has a fixed default port (50051, where clients look
for it); NATS, the KV index and the workers default to free ports, so two stacks run side by side on
one machine. `switchyard up` has a flag for each (--port, --nats-port, --kv-index-port,
--worker-base-port, --pool-control-port, --triton-port); stack.json records the ports picked.
"""
from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

DEFAULT_ROUTER_PORT = 50051
DEFAULT_MODEL = "smollm2-135m"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # gRPC send/receive limit on every server and channel
NATS_MAX_PAYLOAD = 8 * 1024 * 1024    # a prompt of 128k token ids is ~0.5 MB as varints


@dataclass
class StackConfig:
    host: str = "127.0.0.1"
    router_port: int = DEFAULT_ROUTER_PORT
    nats_port: int = 0                   # 0: a free port (`--nats-port`)
    kv_manager_port: int = 0             # the KV index service; 0: a free port (`--kv-index-port`)
    worker_base_port: int = 0            # worker i: worker_base_port + i; 0: free ports (`--worker-base-port`)
    workers: int = 1
    model: str = DEFAULT_MODEL
    # engine / batching (per worker)
    device: str = "cpu"
    num_kv_blocks: int | None = None
    kv_cache_memory_gb: float = 0.5
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None
    max_waiting: int = 256
    admission_window_ms: float = 3.0     # idle batcher: gather arrivals closer than this into one step
    step_pipeline: bool = True           # plan step N+1 while the worker runs step N (batcher/step_timing.py)
    enable_prefix_caching: bool = True
    torch_threads: int | None = None     # per worker; None: the machine's cores / workers
    # LoRA adapters served on the base model by every worker: name -> PEFT folder (adapter_config.json +
    # adapter_model.safetensors); requests pick one with GenerateRequest.adapter_id
    lora_adapters: dict | None = None
    max_loras: int = 4                   # adapter slots per worker (distinct adapters in one batch)
    max_lora_rank: int = 16
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
    worker_timeout_s: float = 3.0        # a batcher silent this long is dropped
    drain_grace_s: float = 30.0          # in-flight streams get this long to finish on SIGTERM
    startup_timeout_s: float = 180.0
    max_message_bytes: int = MAX_MESSAGE_BYTES
    nats_max_payload: int = NATS_MAX_PAYLOAD
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

    def __post_init__(self) -> None:
        from router.routing import POLICIES, normalize_policy
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


def load_config(path: str | Path | None = None, **overrides) -> StackConfig:
    """Read a TOML or JSON file (flat keys = StackConfig fields); overrides that are not None win.

    Unknown keys are an error (a typo should not silently fall back to a default).
    """
    data: dict = {}
    if path is not None:
        p = Path(path)
        text = p.read_text()
        data = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    data.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(StackConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known: {sorted(known)}")
    return StackConfig(**data)


def write_config(cfg: StackConfig, path: str | Path) -> Path:
    """Write cfg as JSON (what the launcher hands its children)."""
    p = Path(path)
    p.write_text(json.dumps(cfg.to_dict(), indent=1))
    return p
