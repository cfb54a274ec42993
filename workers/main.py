"""Worker process: `python -m workers.main --port P [--model M] [--config FILE]`."""
from __future__ import annotations

import argparse
import asyncio
import logging

from services import proc, rpc
from services.config import load_config

SERVICE = "switchyard.v1.Worker"


def engine_config(cfg):
    import os

    from workers.engine.config import EngineConfig
    threads = (cfg.torch_threads or int(os.environ.get("OMP_NUM_THREADS", "0"))
               or max(1, (os.cpu_count() or 1) // max(1, cfg.workers)))
    return EngineConfig(num_threads=threads, device=cfg.device, block_size=cfg.block_size,
                        num_kv_blocks=cfg.num_kv_blocks, kv_cache_memory_gb=cfg.kv_cache_memory_gb,
                        max_num_seqs=cfg.max_num_seqs,
                        max_num_batched_tokens=cfg.max_num_batched_tokens, max_model_len=cfg.max_model_len,
                        enable_prefix_caching=cfg.enable_prefix_caching, max_waiting=cfg.max_waiting,
                        lora_adapters=dict(cfg.lora_adapters or {}), max_loras=cfg.max_loras,
                        max_lora_rank=cfg.max_lora_rank)


async def serve(args) -> None:
    from protos.switchyard.v1 import worker_pb2_grpc
    from telemetry import metrics, tracing
    from workers.engine.loader import load_model
    from workers.engine.model_runner import ModelRunner, resolve_dtype
    from workers.service import WorkerServicer

    cfg = load_config(args.config, model=args.model)
    tracing.setup_from_config("worker", cfg)   # before any server/channel: interceptors
    metrics.serve(args.metrics_port, args.host or cfg.host)
    ecfg = engine_config(cfg)
    srv = rpc.server(cfg.max_message_bytes)
    hs = rpc.add_health_and_reflection(srv, [SERVICE])
    servicer = WorkerServicer(None, args.served_name or cfg.model, ecfg.device,
                              metrics=metrics.WorkerMetrics(cfg.model, args.worker_id))
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, srv)
    port = rpc.bind(srv, args.host or cfg.host, args.port)
    await rpc.set_serving(hs, [SERVICE], False)
    await srv.start()  # listen first: health answers NOT_SERVING while the model loads

    loop = asyncio.get_running_loop()
    loaded = await loop.run_in_executor(None, lambda: load_model(
        cfg.model, device=ecfg.device, dtype=resolve_dtype(ecfg), random_weights=None))
    runner = ModelRunner(loaded, ecfg)
    if runner.lora is not None:   # a configured adapter this base cannot serve is a config error: fail fast
        for name in runner.lora.names():
            await loop.run_in_executor(None, runner.lora.prefetch, name)
    servicer.runner = runner
    await loop.run_in_executor(servicer._executor, servicer.warmup)
    servicer.ready = True
    await rpc.set_serving(hs, [SERVICE], True)
    logging.getLogger("switchyard.worker").info("worker %s serving %s on port %d", args.worker_id, cfg.model, port)

    stop = proc.stop_on_signals()
    await stop.wait()
    await rpc.set_serving(hs, [SERVICE], False)
    await srv.stop(grace=2.0)
    tracing.shutdown()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Switchyard worker (Worker gRPC service)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--worker-id", default="w0")
    ap.add_argument("--served-name", default=None,
                    help="model name to report (model pool: <name>@<version>); default: the model")
    ap.add_argument("--config", default=None)
    ap.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s worker %(levelname)s %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
