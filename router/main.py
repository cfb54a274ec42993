"""Router process: `python -m router.main --port P --nats URL --kv-manager HOST:PORT`."""
from __future__ import annotations

from common.service_main import Service, run_service

SERVICES = ["switchyard.v1.Inference", "switchyard.v1.Admin", "switchyard.v1.Batch"]


async def start(svc: Service) -> None:
    from common import rpc
    from protos.switchyard.v1 import inference_pb2_grpc
    from router.service import Router
    from telemetry import metrics

    cfg = svc.cfg
    router_metrics = metrics.RouterMetrics()
    nc = await svc.connect_nats()
    kv_channel = svc.channel(svc.args.kv_manager or cfg.kv_manager_address)
    router = Router(cfg, nc, kv_channel, metrics=router_metrics)
    ep = svc.grpc_server(SERVICES, svc.port(cfg.router_port))
    # Requests that do not decode or exceed max_request_bytes: INVALID_ARGUMENT, not UNKNOWN (common/rpc.py).
    # Every RPC resolves its caller's tenant first (router/tenants.py): UNAUTHENTICATED before any work.
    authorize = router.tenancy.table.authorizer(on_refused=router.tenancy.unauthenticated)
    rpc.add_checked_servicer(inference_pb2_grpc.add_InferenceServicer_to_server, router, ep.server,
                             cfg.max_request_bytes, on_refused=router.refused, authorize=authorize)
    rpc.add_checked_servicer(inference_pb2_grpc.add_AdminServicer_to_server, router, ep.server,
                             cfg.max_request_bytes, authorize=authorize)
    # Durable bulk jobs on JetStream (router/batch_jobs.py): the Batch service and its item runner.
    from router.batch_runner import BatchJobs
    batch_jobs = BatchJobs(svc, router, ep, authorize=authorize)
    svc.on_stop(router.stop)
    await ep.start(serving=False)
    await router.start()
    await batch_jobs.start()
    svc.on_drain(batch_jobs.drain)   # before router.drain: the runner stops taking items first
    # Drain: NOT_SERVING first (load balancers stop sending), then let open streams finish.
    svc.on_drain(router.drain)
    await ep.set_serving(True)


def main(argv: list[str] | None = None) -> None:
    run_service("router", start, description="Switchyard router (public gRPC endpoint)", argv=argv,
                flags=("port", "host", "nats", "kv-manager", "model"))


if __name__ == "__main__":
    main()
