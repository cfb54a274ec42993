"""A minimal in-process OTLP/gRPC trace receiver (`opentelemetry.proto.collector.trace.v1.TraceService`).

For tests and `switchyard bench tracing`: the stack exports to it as it would to Jaeger on 4317,
and it keeps the spans in memory (as telemetry.breakdown.Span, so the breakdown code reads both).

    with OtlpSink() as sink:          # sink.endpoint == "http://127.0.0.1:<port>"
        ... run a stack with otlp_endpoint=sink.endpoint ...
        spans = sink.wait_for(lambda ss: ..., timeout=10)
"""
from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from telemetry.breakdown import Span


def _any_value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_any_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def _attrs(kvs) -> dict:
    return {kv.key: _any_value(kv.value) for kv in kvs}


class OtlpSink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, host: str = "127.0.0.1", port: int = 0, keep: bool = True):
        self.keep = keep
        self.spans: list[Span] = []
        self.kinds: dict[str, int] = {}        # span id -> OTLP SpanKind
        self.num_spans = 0
        self.num_requests = 0
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        self.endpoint = f"http://{host}:{self.port}"

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context):
        new = []
        n = 0
        for rs in request.resource_spans:
            service = _attrs(rs.resource.attributes).get("service.name", "")
            for ss in rs.scope_spans:
                n += len(ss.spans)
                if not self.keep:
                    continue
                for s in ss.spans:
                    new.append((Span(trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                                     parent_id=s.parent_span_id.hex(), name=s.name, service=service,
                                     start=s.start_time_unix_nano, end=s.end_time_unix_nano,
                                     attributes=_attrs(s.attributes),
                                     events=[(e.name, e.time_unix_nano) for e in s.events],
                                     links=[lk.span_id.hex() for lk in s.links]), s.kind))
        with self._lock:
            self.num_requests += 1
            self.num_spans += n
            for sp, kind in new:
                self.spans.append(sp)
                self.kinds[sp.span_id] = kind
        return trace_service_pb2.ExportTraceServiceResponse()

    def snapshot(self) -> list[Span]:
        with self._lock:
            return list(self.spans)

    def wait_for(self, predicate, timeout: float = 15.0) -> list[Span]:
        """Poll until predicate(spans) is true; returns the spans (raises TimeoutError)."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.snapshot()
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                raise TimeoutError(f"OTLP sink: condition not met after {timeout}s; got {len(spans)} spans: "
                                   f"{sorted((s.service, s.name) for s in spans)}")
            time.sleep(0.1)

    def start(self) -> "OtlpSink":
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(0.5)

    def __enter__(self) -> "OtlpSink":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """`python -m telemetry.otlp_sink [--port P]`: print the endpoint, count spans, print the count on exit."""
    import argparse
    import signal
    import sys

    ap = argparse.ArgumentParser(description="minimal OTLP/gRPC trace receiver (counts spans, keeps none)")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    sink = OtlpSink(port=args.port, keep=False).start()
    print(sink.endpoint, flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    sink.stop()
    print(f"spans {sink.num_spans} exports {sink.num_requests}", flush=True)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
