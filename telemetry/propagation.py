"""W3C trace context across gRPC metadata (grpc.aio interceptors) and NATS message headers.

Only `traceparent` is carried (`00-<trace id>-<span id>-<flags>`), formatted and parsed here
directly (no propagator objects on the hot path). A client that sends its own traceparent gets its
trace continued: the server interceptor starts the SERVER span as a child of it.

`server_interceptors()` / `client_interceptors()` return [] when tracing is off, so a process
without tracing has no interceptor at all.
"""
from __future__ import annotations

import grpc

from telemetry import tracing

TRACEPARENT = "traceparent"

# gRPC methods that get spans: method -> (client span name, server span name). Other methods
# (health, reflection, the Worker/Step stream, Admin) only carry the context, they get no span.
RPC_SPANS = {
    "/switchyard.v1.Inference/Generate": ("client.generate", tracing.ROUTER_GENERATE),
    "/switchyard.v1.Inference/Tokenize": ("client.tokenize", "router.tokenize_rpc"),
    "/switchyard.v1.KvIndex/Match": (tracing.ROUTER_KV_MATCH, tracing.KV_INDEX_MATCH),
}


def format_traceparent(span_context) -> str:
    return f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{int(span_context.trace_flags):02x}"


def traceparent_of(span) -> str:
    sc = span.get_span_context()
    return format_traceparent(sc) if sc.is_valid else ""


def parse_traceparent(value: str | bytes | None):
    """A remote SpanContext, or None when value is not a valid version-00 traceparent."""
    if not value:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff" or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3][:2], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    from opentelemetry.trace import SpanContext, TraceFlags
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags & 0x01))


def context_from_traceparent(value):
    """An OTel Context whose parent is the remote span in `value` (or None: start a new trace)."""
    sc = parse_traceparent(value)
    if sc is None:
        return None
    from opentelemetry.trace import NonRecordingSpan, set_span_in_context
    return set_span_in_context(NonRecordingSpan(sc))


def context_of(span):
    from opentelemetry.trace import set_span_in_context
    return set_span_in_context(span)


# ---- NATS ----------------------------------------------------------------------------------------
def nats_headers(span=None) -> dict | None:
    """Headers carrying `span`'s (default: the current span's) traceparent; None when off."""
    if not tracing.ENABLED:
        return None
    tp = traceparent_of(span if span is not None else tracing.current_span())
    return {TRACEPARENT: tp} if tp else None


def extract_nats(msg, fallback: str = ""):
    """The parent Context of a received NATS message (its traceparent header, else `fallback`)."""
    h = msg.headers
    tp = h.get(TRACEPARENT) if h else None
    return context_from_traceparent(tp or fallback)


# ---- gRPC ----------------------------------------------------------------------------------------
def _metadata_value(metadata, key: str) -> str:
    for k, v in metadata or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return ""


def _set_status(span, code) -> None:
    from opentelemetry.trace import Status, StatusCode
    if code is None or code == grpc.StatusCode.OK:
        return
    name = code.name if isinstance(code, grpc.StatusCode) else str(code)
    span.set_attribute("rpc.grpc.status_code", code.value[0] if isinstance(code, grpc.StatusCode) else -1)
    if code != grpc.StatusCode.CANCELLED:
        span.set_status(Status(StatusCode.ERROR, name))


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Extract traceparent from the call's metadata; SERVER span around the methods in RPC_SPANS."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        names = RPC_SPANS.get(handler_call_details.method)
        if handler is None or names is None or not tracing.ENABLED:
            return handler
        name = names[1]
        tp = _metadata_value(handler_call_details.invocation_metadata, TRACEPARENT)
        service, _, method = handler_call_details.method.lstrip("/").partition("/")
        attrs = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}

        from opentelemetry import context as otel_context
        from opentelemetry.trace import SpanKind, set_span_in_context

        def start():
            parent = context_from_traceparent(tp)
            span = tracing.tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attrs)
            return span, otel_context.attach(set_span_in_context(span, parent))

        if handler.unary_stream is not None:
            inner = handler.unary_stream

            async def unary_stream(request, context):
                span, token = start()
                try:
                    async for resp in inner(request, context):
                        yield resp
                except BaseException as e:
                    _finish_error(span, context, e)
                    raise
                finally:
                    _end(span, context, token)
            return grpc.unary_stream_rpc_method_handler(unary_stream, handler.request_deserializer,
                                                        handler.response_serializer)
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request, context):
                span, token = start()
                try:
                    return await inner_uu(request, context)
                except BaseException as e:
                    _finish_error(span, context, e)
                    raise
                finally:
                    _end(span, context, token)
            return grpc.unary_unary_rpc_method_handler(unary_unary, handler.request_deserializer,
                                                       handler.response_serializer)
        return handler


def _finish_error(span, context, exc) -> None:
    import asyncio
    if isinstance(exc, asyncio.CancelledError):
        span.set_attribute("rpc.cancelled", True)
        return
    if not isinstance(exc, grpc.aio.AbortError):
        span.record_exception(exc)


def _end(span, context, token) -> None:
    from opentelemetry import context as otel_context
    try:
        _set_status(span, context.code())
    except Exception:
        pass
    span.end()
    try:
        otel_context.detach(token)
    except Exception:
        pass


class UnaryClientInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Inject the current context's traceparent; CLIENT span for the methods in RPC_SPANS.

    Calls made outside any span (health polls, status) carry nothing and get no span.
    """

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        if not tracing.ENABLED:
            return await continuation(client_call_details, request)
        parent = tracing.current_span()
        if not parent.get_span_context().is_valid:
            return await continuation(client_call_details, request)
        method = client_call_details.method
        method = method.decode() if isinstance(method, bytes) else method
        names = RPC_SPANS.get(method)
        span = None
        if names is not None:
            from opentelemetry.trace import SpanKind
            service, _, m = method.lstrip("/").partition("/")
            span = tracing.tracer.start_span(names[0], kind=SpanKind.CLIENT, attributes={
                "rpc.system": "grpc", "rpc.service": service, "rpc.method": m})
        tp = traceparent_of(span if span is not None else parent)
        md = list(client_call_details.metadata or ()) + [(TRACEPARENT, tp)]
        details = grpc.aio.ClientCallDetails(client_call_details.method, client_call_details.timeout,
                                             grpc.aio.Metadata(*md), client_call_details.credentials,
                                             client_call_details.wait_for_ready)
        try:
            call = await continuation(details, request)
            if span is not None:
                await call
            return call
        except grpc.aio.AioRpcError as e:
            if span is not None:
                _set_status(span, e.code())
            raise
        except BaseException as e:
            if span is not None:
                span.record_exception(e)
            raise
        finally:
            if span is not None:
                span.end()


def server_interceptors() -> list:
    return [ServerInterceptor()] if tracing.ENABLED else []


def client_interceptors() -> list:
    return [UnaryClientInterceptor()] if tracing.ENABLED else []
