"""Batcher process: `python -m batcher.main --worker-id w0 --worker-addr HOST:PORT --nats URL`."""
from __future__ import annotations

from common.service_main import Service, run_service


async def start(svc: Service) -> None:
    from batcher.service import BatcherService
    from telemetry import metrics

    cfg, wid = svc.cfg, svc.args.worker_id
    batcher_metrics = metrics.BatcherMetrics(cfg.model, wid, cfg.gpu_price(wid))
    nc = await svc.connect_nats(f"batcher-{wid}")
    batcher = BatcherService(cfg, wid, svc.args.worker_addr, nc, metrics=batcher_metrics)
    svc.on_stop(batcher.stop)
    svc.on_drain(batcher.drain)   # stop admitting; running requests get drain_grace_s
    await batcher.start(ready_timeout=cfg.startup_timeout_s)   # waits for the worker to be ready


def main(argv: list[str] | None = None) -> None:
    run_service("batcher", start, description="Switchyard batcher (drives one worker)", argv=argv,
                flags=("worker-id", "worker-addr", "nats"), required=("worker-id", "worker-addr"))


if __name__ == "__main__":
    main()
