"""KV index process: `python -m kv_manager.main --port P --nats URL`."""
from __future__ import annotations

from common.service_main import Service, run_service

SERVICE = "switchyard.v1.KvIndex"


async def start(svc: Service) -> None:
    from kv_manager.service import KvIndexService
    from protos.switchyard.v1 import kv_index_pb2_grpc
    from telemetry import metrics

    cfg = svc.cfg
    index = KvIndexService(cfg.worker_timeout_s, metrics=metrics.KvIndexMetrics())
    nc = await svc.connect_nats()
    svc.on_stop(index.stop)
    await index.start(nc)
    ep = svc.grpc_server([SERVICE], svc.port(cfg.kv_manager_port))
    kv_index_pb2_grpc.add_KvIndexServicer_to_server(index, ep.server)
    await ep.start(serving=True)


def main(argv: list[str] | None = None) -> None:
    run_service("kv_manager", start, description="Switchyard KV index service", argv=argv,
                flags=("port", "host", "nats"))


if __name__ == "__main__":
    main()
