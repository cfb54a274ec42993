"""KV index process: `python -m kv_manager.main --port P --nats URL`."""
from __future__ import annotations

import argparse
import asyncio
import logging

from services import proc, rpc
from services.config import load_config

SERVICE = "switchyard.v1.KvIndex"


async def serve(args) -> None:
    import nats

    from kv_manager.service import KvIndexService
    from protos.switchyard.v1 import kv_index_pb2_grpc
    from telemetry import metrics, tracing

    cfg = load_config(args.config)
    tracing.setup_from_config("kv_manager", cfg)   # before any server/channel: interceptors
    kv_metrics = metrics.KvIndexMetrics()
    metrics.serve(args.metrics_port, args.host or cfg.host)
    nc = await nats.connect(args.nats or cfg.nats_url, name="kv_manager",
                            max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    svc = KvIndexService(cfg.worker_timeout_s, metrics=kv_metrics)
    await svc.start(nc)
    srv = rpc.server(cfg.max_message_bytes)
    kv_index_pb2_grpc.add_KvIndexServicer_to_server(svc, srv)
    hs = rpc.add_health_and_reflection(srv, [SERVICE])
    rpc.bind(srv, args.host or cfg.host, args.port if args.port is not None else cfg.kv_manager_port)
    await srv.start()
    await rpc.set_serving(hs, [SERVICE], True)

    stop = proc.stop_on_signals()
    await stop.wait()
    await rpc.set_serving(hs, [SERVICE], False)
    await srv.stop(grace=1.0)
    await svc.stop()
    await nc.drain()
    tracing.shutdown()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Switchyard KV index service")
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--host", default=None)
    ap.add_argument("--nats", default=None)
    ap.add_argument("--config", default=None)
    ap.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s kv_manager %(levelname)s %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
