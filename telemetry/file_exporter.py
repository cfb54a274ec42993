"""`switchyard up --trace-file PATH`: finished spans as OTLP JSON lines, for people without Jaeger.

One line per export batch, each an OTLP/JSON `ExportTraceServiceRequest` (the encoding of the
OTLP spec: trace and span ids as lower-case hex, times as decimal strings in `*UnixNano`). Every
service process appends to the same file; each batch is one `os.write` on an O_APPEND descriptor,
so lines from different processes never interleave. Runs on the BatchSpanProcessor's thread.
"""
from __future__ import annotations

import json
import os
import threading
from collections import defaultdict

from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult


def _value(v) -> dict:
    if isinstance(v, bool):
        return {"boolValue": v}
    if isinstance(v, int):
        return {"intValue": str(v)}
    if isinstance(v, float):
        return {"doubleValue": v}
    if isinstance(v, (list, tuple)):
        return {"arrayValue": {"values": [_value(x) for x in v]}}
    return {"stringValue": str(v)}


def _attrs(attrs) -> list[dict]:
    return [{"key": k, "value": _value(v)} for k, v in (attrs or {}).items()]


def span_to_otlp(span) -> dict:
    ctx = span.context
    d = {"traceId": f"{ctx.trace_id:032x}", "spanId": f"{ctx.span_id:016x}", "name": span.name,
         "kind": int(span.kind.value) + 1,  # SDK SpanKind INTERNAL=0; OTLP SPAN_KIND_INTERNAL=1
         "startTimeUnixNano": str(span.start_time), "endTimeUnixNano": str(span.end_time),
         "attributes": _attrs(span.attributes)}
    if span.parent is not None:
        d["parentSpanId"] = f"{span.parent.span_id:016x}"
    if span.events:
        d["events"] = [{"timeUnixNano": str(e.timestamp), "name": e.name, "attributes": _attrs(e.attributes)}
                       for e in span.events]
    if span.links:
        d["links"] = [{"traceId": f"{link.context.trace_id:032x}", "spanId": f"{link.context.span_id:016x}",
                       "attributes": _attrs(link.attributes)} for link in span.links]
    code = int(span.status.status_code.value)
    if code:
        d["status"] = {"code": code, **({"message": span.status.description} if span.status.description else {})}
    return d


def spans_to_request(spans) -> dict:
    by_resource: dict = defaultdict(lambda: defaultdict(list))
    resources = {}
    for s in spans:
        rkey = id(s.resource)
        resources[rkey] = s.resource
        scope = s.instrumentation_scope
        by_resource[rkey][(scope.name if scope else "", scope.version if scope else "")].append(span_to_otlp(s))
    out = []
    for rkey, scopes in by_resource.items():
        out.append({"resource": {"attributes": _attrs(resources[rkey].attributes)},
                    "scopeSpans": [{"scope": {"name": n, **({"version": v} if v else {})}, "spans": ss}
                                   for (n, v), ss in scopes.items()]})
    return {"resourceSpans": out}


class OtlpJsonFileExporter(SpanExporter):
    def __init__(self, path: str):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()

    def export(self, spans) -> SpanExportResult:
        if not spans:
            return SpanExportResult.SUCCESS
        line = (json.dumps(spans_to_request(spans), separators=(",", ":")) + "\n").encode()
        with self._lock:
            if self._fd < 0:
                return SpanExportResult.FAILURE
            os.write(self._fd, line)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
