"""gRPC plumbing shared by every server and client: message size limits, health, reflection."""
from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.config import MAX_MESSAGE_BYTES


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


def sync_channel(target: str, max_bytes: int = MAX_MESSAGE_BYTES) -> grpc.Channel:
    """A blocking channel with the same limits (the CLI's commands: status, models, admin, adapters)."""
    return grpc.insecure_channel(target, options=options(max_bytes))


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
        from common.ports import PortInUseError
        raise PortInUseError(f"cannot listen on {host}:{port} (in use or not permitted)")
    return bound


def message_dict(msg) -> dict:
    """A protobuf message as a JSON-able dict for the CLI's `--json`: field names as in the .proto,
    every field present, and 64-bit integers as numbers (protobuf's JSON mapping writes them as
    strings, so `prompt_tokens_total` would read "1234")."""
    from google.protobuf.json_format import MessageToDict
    d = MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return _int64_as_numbers(msg.DESCRIPTOR, d)


def _int64_as_numbers(desc, d: dict) -> dict:
    from google.protobuf.descriptor import FieldDescriptor as F
    int64 = {F.TYPE_INT64, F.TYPE_UINT64, F.TYPE_SINT64, F.TYPE_FIXED64, F.TYPE_SFIXED64}
    for f in desc.fields:
        if f.name not in d:
            continue
        v, repeated = d[f.name], f.is_repeated
        if f.message_type is not None:
            if f.message_type.GetOptions().map_entry:   # map<k, v>: a dict
                vf = f.message_type.fields_by_name["value"]
                if vf.message_type is not None:
                    d[f.name] = {k: _int64_as_numbers(vf.message_type, x) for k, x in v.items()}
                elif vf.type in int64:
                    d[f.name] = {k: int(x) for k, x in v.items()}
            elif not f.message_type.full_name.startswith("google.protobuf."):   # well-known types keep their form
                d[f.name] = [_int64_as_numbers(f.message_type, x) for x in v] if repeated \
                    else _int64_as_numbers(f.message_type, v)
        elif f.type in int64:
            d[f.name] = [int(x) for x in v] if repeated else int(v)
    return d
