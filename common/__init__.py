"""Shared plumbing every service process stands on: the one configuration (config.py, catalog.py), NATS
subject names (subjects.py), gRPC helpers (rpc.py), finish reasons <-> protobuf (bus_codec.py), ports,
child processes (proc.py), the service skeleton (service_main.py), waiting on events (waiting.py), the
tokenizer lookup (tokenizers.py) and the live table of replicas fed by heartbeats (replicas.py).

Layer: above protos, telemetry and the engine library (workers/engine: EngineConfig, the tokenizer
loader); below every service (kv_manager, workers, batcher, router) and the launcher, pool and CLI
(services/). Nothing here imports a layer above it (docs/architecture.md, tests/test_layers.py).
"""
