"""Per-process OpenTelemetry setup (one call in each service's main) and the hot-path guard.

    tracing.setup("router", otlp_endpoint=cfg.otlp_endpoint, trace_file=cfg.trace_file,
                  sample_ratio=cfg.trace_sample_ratio)

With no OTLP endpoint (argument or OTEL_EXPORTER_OTLP_ENDPOINT) and no trace file (argument or
SWITCHYARD_TRACE_FILE), nothing is set up: no SDK import, no provider, `ENABLED` stays False and
every instrumentation site is one module-attribute test (`if tracing.ENABLED:`). Otherwise: a
TracerProvider with `service.name` = switchyard-<component>, parent-based ratio sampling, and a
BatchSpanProcessor per exporter (OTLP gRPC and/or OTLP JSON lines, telemetry/file_exporter.py).

Span names follow `<component>.<operation>` (DESIGN.md, "Names"); the constants are below.
"""
from __future__ import annotations

import contextlib
import os

ENABLED = False
tracer = None            # an opentelemetry Tracer once set up
COMPONENT = ""
_provider = None
_NULL = contextlib.nullcontext()

SERVICE_NAMES = {"router": "switchyard-router", "batcher": "switchyard-batcher", "worker": "switchyard-worker",
                 "kv_manager": "switchyard-kv-manager"}

# Span names, in one place (breakdown.py reads the same constants).
ROUTER_GENERATE = "router.generate"
ROUTER_VALIDATE = "router.validate"
ROUTER_TOKENIZE = "router.tokenize"
ROUTER_ROUTE = "router.route"
ROUTER_KV_MATCH = "router.kv_match"          # CLIENT side of KvIndex/Match
ROUTER_PUBLISH = "router.publish"            # NATS PRODUCER (sy.req.<worker>)
KV_INDEX_MATCH = "kv_index.match"            # SERVER side of KvIndex/Match
BATCHER_RECEIVE = "batcher.receive"          # NATS CONSUMER (admission)
BATCHER_QUEUE = "batcher.queue"
BATCHER_PREFILL = "batcher.prefill"
BATCHER_DECODE = "batcher.decode"
WORKER_STEP = "worker.step"
FIRST_TOKEN_EVENT = "gen_ai.first_token"

ENV_TRACE_FILE = "SWITCHYARD_TRACE_FILE"
ENV_OTLP = "OTEL_EXPORTER_OTLP_ENDPOINT"
ENV_SAMPLE = "SWITCHYARD_TRACE_SAMPLE_RATIO"


def setup(component: str, *, otlp_endpoint: str = "", trace_file: str = "", sample_ratio: float | None = None) -> bool:
    """Install the tracer provider for this process; returns whether tracing is on."""
    global ENABLED, tracer, COMPONENT, _provider
    COMPONENT = component
    endpoint = otlp_endpoint or os.environ.get(ENV_OTLP, "")
    path = trace_file or os.environ.get(ENV_TRACE_FILE, "")
    if not endpoint and not path:
        return False
    if sample_ratio is None:
        sample_ratio = float(os.environ.get(ENV_SAMPLE, "1.0"))
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    resource = Resource.create({"service.name": SERVICE_NAMES.get(component, f"switchyard-{component}"),
                                "service.namespace": "switchyard"})
    provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
    if endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        target = endpoint.split("://", 1)[-1]
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=target, insecure=True),
                                                       schedule_delay_millis=1000))
    if path:
        from telemetry.file_exporter import OtlpJsonFileExporter
        provider.add_span_processor(BatchSpanProcessor(OtlpJsonFileExporter(path), schedule_delay_millis=1000))
    trace.set_tracer_provider(provider)
    _provider = provider
    tracer = provider.get_tracer("switchyard")
    ENABLED = True
    return True


def shutdown() -> None:
    """Flush and stop the exporters (call before the process exits)."""
    global ENABLED
    if _provider is not None:
        ENABLED = False
        try:
            _provider.shutdown()
        except Exception:
            pass


def force_flush(timeout_ms: int = 5000) -> None:
    if _provider is not None:
        _provider.force_flush(timeout_ms)


def span(name: str, attributes: dict | None = None):
    """`with tracing.span("router.tokenize"):` - a current span, or a shared no-op when off."""
    if not ENABLED:
        return _NULL
    return tracer.start_as_current_span(name, attributes=attributes)


def current_span():
    from opentelemetry import trace
    return trace.get_current_span()


def setup_from_config(component: str, cfg) -> bool:
    """setup() from a StackConfig's otlp_endpoint / trace_file / trace_sample_ratio."""
    return setup(component, otlp_endpoint=getattr(cfg, "otlp_endpoint", ""), trace_file=getattr(cfg, "trace_file", ""),
                 sample_ratio=getattr(cfg, "trace_sample_ratio", None))
