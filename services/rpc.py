"""gRPC plumbing shared by every server and client: message size limits, health, reflection."""
from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.config import MAX_MESSAGE_BYTES


def options(max_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
    ]


def server(max_bytes: int = MAX_MESSAGE_BYTES) -> grpc.aio.Server:
    from telemetry.propagation import server_interceptors  # [] unless tracing is set up
    return grpc.aio.server(options=options(max_bytes) + [("grpc.so_reuseport", 0)],
                           interceptors=server_interceptors() or None)


def channel(target: str, max_bytes: int = MAX_MESSAGE_BYTES) -> grpc.aio.Channel:
    from telemetry.propagation import client_interceptors  # [] unless tracing is set up
    return grpc.aio.insecure_channel(target, options=options(max_bytes), interceptors=client_interceptors() or None)


def add_health_and_reflection(srv: grpc.aio.Server, service_full_names: list[str]) -> health.aio.HealthServicer:
    """Register grpc.health.v1 (overall "" plus each service) and server reflection.

    Returns the health servicer; callers flip it to SERVING when ready and NOT_SERVING to drain.
    """
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, srv)
    names = list(service_full_names) + [health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, srv)
    return hs


async def set_serving(hs: health.aio.HealthServicer, services: list[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *services]:
        await hs.set(name, status)


def bind(srv: grpc.aio.Server, host: str, port: int) -> int:
    """Bind insecure host:port; raise a clear error when the port is taken."""
    bound = srv.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        from services.ports import PortInUseError
        raise PortInUseError(f"cannot listen on {host}:{port} (in use or not permitted)")
    return bound
