"""Router process: `python -m router.main --port P --nats URL --kv-manager HOST:PORT`."""
from __future__ import annotations

import argparse
import asyncio
import logging

from services import proc, rpc
from services.config import load_config

SERVICES = ["switchyard.v1.Inference", "switchyard.v1.Admin"]


async def serve(args) -> None:
    import nats

    from protos.switchyard.v1 import inference_pb2_grpc
    from router.service import Router
    from telemetry import metrics, tracing

    cfg = load_config(args.config, model=args.model)
    tracing.setup_from_config("router", cfg)   # before any server/channel: interceptors
    router_metrics = metrics.RouterMetrics()
    metrics.serve(args.metrics_port, args.host or cfg.host)
    nc = await nats.connect(args.nats or cfg.nats_url, name="router",
                            max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    kv_channel = rpc.channel(args.kv_manager or cfg.kv_manager_address, cfg.max_message_bytes)
    router = Router(cfg, nc, kv_channel, metrics=router_metrics)
    srv = rpc.server(cfg.max_message_bytes)
    inference_pb2_grpc.add_InferenceServicer_to_server(router, srv)
    inference_pb2_grpc.add_AdminServicer_to_server(router, srv)
    hs = rpc.add_health_and_reflection(srv, SERVICES)
    rpc.bind(srv, args.host or cfg.host, args.port if args.port is not None else cfg.router_port)
    await rpc.set_serving(hs, SERVICES, False)
    await srv.start()
    await router.start()
    await rpc.set_serving(hs, SERVICES, True)

    stop = proc.stop_on_signals()
    await stop.wait()
    # Drain: NOT_SERVING first (load balancers stop sending), then let open streams finish.
    await rpc.set_serving(hs, SERVICES, False)
    await router.drain(cfg.drain_grace_s)
    await srv.stop(grace=1.0)
    await router.stop()
    await kv_channel.close()
    await nc.drain()
    tracing.shutdown()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Switchyard router (public gRPC endpoint)")
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--host", default=None)
    ap.add_argument("--nats", default=None)
    ap.add_argument("--kv-manager", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--config", default=None)
    ap.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s router %(levelname)s %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
