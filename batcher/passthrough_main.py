"""Pass-through batcher process: `python -m batcher.passthrough_main --worker-id w0 --config C`.

Relays the worker's requests to an external engine (StackConfig.backend: triton | tensorrt-llm).
"""
from __future__ import annotations

from common.service_main import Service, run_service


async def start(svc: Service) -> None:
    from batcher.passthrough import PassthroughBatcher
    from telemetry import metrics
    from workers.backends.factory import make_backend

    cfg, wid = svc.cfg, svc.args.worker_id
    batcher_metrics = metrics.BatcherMetrics(cfg.model, wid, cfg.gpu_price(wid))
    backend = make_backend(cfg.backend, cfg.backend_url, cfg.backend_model or cfg.model)
    nc = await svc.connect_nats(f"batcher-{wid}")
    batcher = PassthroughBatcher(cfg, wid, nc, backend, max_concurrency=cfg.backend_max_concurrency,
                                 metrics=batcher_metrics)
    svc.on_stop(batcher.stop)
    svc.on_drain(batcher.drain)
    await batcher.start(ready_timeout=cfg.startup_timeout_s)   # waits for the backend to be ready


def main(argv: list[str] | None = None) -> None:
    run_service("passthrough", start, description="Switchyard pass-through batcher (external engine backend)",
                argv=argv, flags=("worker-id", "nats"), required=("worker-id",), tracing_name="batcher")


if __name__ == "__main__":
    main()
