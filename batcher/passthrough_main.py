"""Pass-through batcher process: `python -m batcher.passthrough_main --worker-id w0 --config C`.

Relays the worker's requests to an external engine (StackConfig.backend: triton | tensorrt-llm).
"""
from __future__ import annotations

import argparse
import asyncio
import logging

from batcher.main import gpu_price, run_until_signalled
from services.config import load_config


async def serve(args) -> None:
    import nats

    from batcher.passthrough import PassthroughBatcher
    from telemetry import metrics, tracing
    from workers.backends.base import make_backend

    cfg = load_config(args.config)
    tracing.setup_from_config("batcher", cfg)
    batcher_metrics = metrics.BatcherMetrics(cfg.model, args.worker_id, gpu_price(cfg, args.worker_id))
    metrics.serve(args.metrics_port, cfg.host)
    backend = make_backend(cfg.backend, cfg.backend_url, cfg.backend_model or cfg.model)
    nc = await nats.connect(args.nats or cfg.nats_url, name=f"batcher-{args.worker_id}",
                            max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    svc = PassthroughBatcher(cfg, args.worker_id, nc, backend, max_concurrency=cfg.backend_max_concurrency,
                             metrics=batcher_metrics)
    await run_until_signalled(svc, cfg, nc)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Switchyard pass-through batcher (external engine backend)")
    ap.add_argument("--worker-id", required=True)
    ap.add_argument("--nats", default=None)
    ap.add_argument("--config", default=None)
    ap.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s passthrough %(levelname)s %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
