"""Stack configuration: one flat dataclass, loaded from TOML or JSON (`switchyard up --config`).

Port 0 means "pick a free one" (tests and `switchyard up` with several stacks on one box).
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
    nats_port: int = 4222
    kv_manager_port: int = 50052
    worker_base_port: int = 50060        # worker i listens on worker_base_port + i (0: free ports)
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
    enable_prefix_caching: bool = True
    # routing
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
