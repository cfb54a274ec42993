"""Batcher process: `python -m batcher.main --worker-id w0 --worker-addr HOST:PORT --nats URL`."""
from __future__ import annotations

import argparse
import asyncio
import logging

from services import proc
from services.config import load_config


def gpu_price(cfg, worker_id: str) -> float:
    """USD per GPU-hour of this worker: the per-worker override, else the config default."""
    return cfg.gpu_price(worker_id)


async def serve(args) -> None:
    import nats

    from batcher.service import BatcherService
    from telemetry import metrics, tracing

    cfg = load_config(args.config)
    tracing.setup_from_config("batcher", cfg)   # before any server/channel: interceptors
    batcher_metrics = metrics.BatcherMetrics(cfg.model, args.worker_id, gpu_price(cfg, args.worker_id))
    metrics.serve(args.metrics_port, cfg.host)
    nc = await nats.connect(args.nats or cfg.nats_url, name=f"batcher-{args.worker_id}",
                            max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    svc = BatcherService(cfg, args.worker_id, args.worker_addr, nc, metrics=batcher_metrics)
    await run_until_signalled(svc, cfg, nc)


async def run_until_signalled(svc, cfg, nc) -> None:
    """Start a batcher service, serve until SIGTERM/SIGINT, drain in-flight work, stop.

    Shared by the engine batcher and the pass-through batcher (same start/drain/stop shape)."""
    from telemetry import tracing

    stop = proc.stop_on_signals()
    start = asyncio.create_task(svc.start(ready_timeout=cfg.startup_timeout_s))
    done, _ = await asyncio.wait({start, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if start in done:
        start.result()  # raise (exit non-zero with the reason) if the worker/backend never came up
        await stop.wait()
        await svc.drain(cfg.drain_grace_s)
    else:
        start.cancel()
    await svc.stop()
    await nc.drain()
    tracing.shutdown()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Switchyard batcher (drives one worker)")
    ap.add_argument("--worker-id", required=True)
    ap.add_argument("--worker-addr", required=True)
    ap.add_argument("--nats", default=None)
    ap.add_argument("--config", default=None)
    ap.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s batcher %(levelname)s %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
