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
    """An aio channel; TLS with this process's certificate when common/tls.py is configured (`tls = true`)."""
    from common import tls
    from telemetry.propagation import client_interceptors  # [] unless tracing is set up
    s = tls.current()
    if s is not None:
        return grpc.aio.secure_channel(target, tls.channel_credentials(s), options=options(max_bytes),
                                       interceptors=client_interceptors() or None)
    return grpc.aio.insecure_channel(target, options=options(max_bytes), interceptors=client_interceptors() or None)


def sync_channel(target: str, max_bytes: int = MAX_MESSAGE_BYTES) -> grpc.Channel:
    """A blocking channel with the same limits (the CLI's commands: status, models, admin, adapters);
    TLS as `channel`."""
    from common import tls
    s = tls.current()
    if s is not None:
        return _with_caller_token(grpc.secure_channel(target, tls.channel_credentials(s), options=options(max_bytes)))
    return _with_caller_token(grpc.insecure_channel(target, options=options(max_bytes)))


class _CallerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer $SWITCHYARD_TOKEN` (a tenant token: router/tenants.py) to a CLI call
    that carries none (an admin command's --token wins)."""

    def __init__(self, token: str):
        self._md = ("authorization", f"Bearer {token}")

    def _details(self, d):
        md = list(d.metadata or ())
        if any(k == "authorization" for k, _ in md):
            return d
        return d._replace(metadata=[*md, self._md]) if hasattr(d, "_replace") else d

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)


def _with_caller_token(ch: grpc.Channel) -> grpc.Channel:
    import os
    token = os.environ.get("SWITCHYARD_TOKEN", "")
    return grpc.intercept_channel(ch, _CallerToken(token)) if token else ch


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
    """Bind host:port (TLS when common/tls.py is configured: a front door's policy or mutual TLS inside);
    raise a clear error when the port is taken."""
    from common import tls
    s = tls.current()
    bound = srv.add_secure_port(f"{host}:{port}", tls.server_credentials(s)) if s is not None \
        else srv.add_insecure_port(f"{host}:{port}")
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


# ---- front doors: requests that cannot be decoded, or are too large, get INVALID_ARGUMENT -------------
class Refused:
    """What the checked deserializer returns instead of a message: the handler answers INVALID_ARGUMENT."""

    def __init__(self, message: str):
        self.message = message


def checked_deserializer(parse, name: str, max_request_bytes: int = 0):
    """A request deserializer that never raises (grpc would answer UNKNOWN with the exception's class):
    a request over max_request_bytes is refused before it is parsed, one that does not decode (garbage
    bytes, invalid UTF-8 in a string field) is refused with protobuf's reason."""
    from google.protobuf.message import DecodeError

    def deserialize(data: bytes):
        if max_request_bytes and len(data) > max_request_bytes:
            return Refused(f"request is {len(data)} bytes; the limit (max_request_bytes) is "
                           f"{max_request_bytes} bytes")
        try:
            return parse(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as e:
            return Refused(f"request could not be decoded as {name}: {e}")
    return deserialize


def _checked_handler(handler, service: str, method: str, max_request_bytes: int, on_refused):
    """The same method handler with a checked deserializer and a behaviour that answers a Refused."""
    parse = handler.request_deserializer
    if parse is None:
        return handler
    name = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
    name = name.full_name if name is not None else f"{service}/{method} request"
    if handler.request_streaming:
        # A message on a request stream that does not decode arrives as a Refused item: the servicer
        # answers it on the stream (Triton's ModelStreamInfer: an error_message) and the stream goes on.
        return handler._replace(request_deserializer=checked_deserializer(parse, name, max_request_bytes))

    async def refuse(context, r: Refused):
        if on_refused is not None:
            on_refused(method, r)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, r.message)

    if handler.response_streaming:
        behavior = handler.unary_stream

        async def unary_stream(request, context):
            if isinstance(request, Refused):
                await refuse(context, request)
                return
            async for item in behavior(request, context):
                yield item
        return handler._replace(request_deserializer=checked_deserializer(parse, name, max_request_bytes),
                                unary_stream=unary_stream)
    behavior = handler.unary_unary

    async def unary_unary(request, context):
        if isinstance(request, Refused):
            await refuse(context, request)
        return await behavior(request, context)
    return handler._replace(request_deserializer=checked_deserializer(parse, name, max_request_bytes),
                            unary_unary=unary_unary)


def _authorized_handler(handler, full_method: str, authorize):
    """The same method handler, calling `await authorize(full_method, context)` before its behaviour
    (which aborts an unauthenticated caller and records who called; router/tenants.py)."""
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request, context):
            await authorize(full_method, context)
            return await inner_uu(request, context)
        return handler._replace(unary_unary=unary_unary)
    if handler.unary_stream is not None:
        inner_us = handler.unary_stream

        async def unary_stream(request, context):
            await authorize(full_method, context)
            async for item in inner_us(request, context):
                yield item
        return handler._replace(unary_stream=unary_stream)
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(request_iterator, context):
            await authorize(full_method, context)
            return await inner_su(request_iterator, context)
        return handler._replace(stream_unary=stream_unary)
    inner_ss = handler.stream_stream

    async def stream_stream(request_iterator, context):
        await authorize(full_method, context)
        async for item in inner_ss(request_iterator, context):
            yield item
    return handler._replace(stream_stream=stream_stream)


class _CheckedServer:
    """Stands in for the server in a generated `add_XServicer_to_server`, wrapping each method handler."""

    def __init__(self, server, max_request_bytes: int, on_refused, authorize=None):
        self._server = server
        self._max = max_request_bytes
        self._on_refused = on_refused
        self._authorize = authorize
        self._wrapped: dict[str, dict] = {}

    def _wrap(self, service: str, handlers: dict) -> dict:
        if service not in self._wrapped:
            self._wrapped[service] = {m: _checked_handler(h, service, m, self._max, self._on_refused)
                                      for m, h in handlers.items()}
            if self._authorize is not None:   # every method: no RPC can forget the caller check
                self._wrapped[service] = {m: _authorized_handler(h, f"/{service}/{m}", self._authorize)
                                          for m, h in self._wrapped[service].items()}
        return self._wrapped[service]

    def add_generic_rpc_handlers(self, handlers) -> None:
        out = []
        for h in handlers:   # grpc.method_handlers_generic_handler(service, {method: handler})
            service, methods = getattr(h, "_name", None), getattr(h, "_method_handlers", None)
            if isinstance(service, str) and isinstance(methods, dict):   # keyed "/service/method"
                methods = {k.rsplit("/", 1)[-1]: v for k, v in methods.items()}
                h = grpc.method_handlers_generic_handler(service, self._wrap(service, methods))
            out.append(h)
        self._server.add_generic_rpc_handlers(tuple(out))

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self._server.add_registered_method_handlers(service, self._wrap(service, handlers))


def add_checked_servicer(add_fn, servicer, server, max_request_bytes: int = 0, on_refused=None,
                         authorize=None) -> None:
    """`add_fn(servicer, server)` (a generated add_XServicer_to_server) for a front door: requests that
    do not decode, or exceed max_request_bytes (0: no limit beyond max_message_bytes), are answered
    INVALID_ARGUMENT with the reason; on_refused(method, Refused) is called first (metrics).
    authorize: `async (full method name, context)` run before every method (tenants: router/tenants.py)."""
    add_fn(servicer, _CheckedServer(server, max_request_bytes, on_refused, authorize))


def describe(err) -> str:
    """A gRPC error as a person reads it: "CODE: details", one line, without grpc's debug_error_string
    (str() of an RpcError carries it: addresses, file names, timestamps over several lines)."""
    code = err.code() if callable(getattr(err, "code", None)) else None
    details = err.details() if callable(getattr(err, "details", None)) else None
    if code is None and details is None:
        return " ".join(str(err).split())
    text = " ".join(str(details or "").split())
    name = getattr(code, "name", str(code))
    return f"{name}: {text}" if text else name
