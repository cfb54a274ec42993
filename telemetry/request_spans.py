"""The batcher's request-level spans: batcher.receive (NATS CONSUMER), batcher.queue, batcher.prefill,
batcher.decode, and the trace context each engine step hands the worker for its `worker.step` span.

Per request there are at most four span objects over its whole life, created at its events
(arrival, first schedule, first token, finish), never per token. Per step, `step_context` costs one
dict lookup per request in the step, and only while traced requests are in flight.

Parent chain: router.publish -> batcher.receive -> batcher.queue / batcher.prefill / batcher.decode;
worker.step -> the prefill span of the first request prefilling in that step (else the decode span
of the first request in it), with links to every traced request in the step. A step planned for
a request whose first token has not landed yet (the batcher plans a step ahead) is a decode step,
but its decode span does not exist yet: that step hangs off (and links) batcher.receive, so the
prefill span still has exactly its own steps.
"""
from __future__ import annotations

from telemetry import propagation, tracing

QUEUED, PREFILL, DECODE = 0, 1, 2


class _Req:
    __slots__ = ("ctx", "span", "phase", "tp", "model", "prompt_tokens", "planned", "target", "recv_tp")

    def __init__(self, ctx, span, model: str, prompt_tokens: int, recv_tp: str = ""):
        self.ctx = ctx          # Context whose parent is batcher.receive
        self.recv_tp = recv_tp  # traceparent of batcher.receive
        self.span = span        # the open one of queue / prefill / decode
        self.phase = QUEUED
        self.tp = ""            # traceparent of the open span (worker.step parent / link)
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.planned = 0        # tokens of its (re)computation planned so far
        self.target = 0         # tokens to compute before its next token is sampled


class BatcherSpans:
    def __init__(self, worker_id: str):
        self.worker_id = worker_id
        self.reqs: dict[str, _Req] = {}

    # ---- arrival -----------------------------------------------------------------------------
    def receive(self, msg, req):
        """Start batcher.receive for a BatchRequest just taken off NATS; returns the span."""
        from opentelemetry.trace import SpanKind
        parent = propagation.extract_nats(msg, req.traceparent)
        return tracing.tracer.start_span(tracing.BATCHER_RECEIVE, context=parent, kind=SpanKind.CONSUMER, attributes={
            "messaging.system": "nats", "messaging.operation.type": "receive",
            "messaging.destination.name": msg.subject, "messaging.message.id": req.request_id,
            "switchyard.request_id": req.request_id, "switchyard.worker_id": self.worker_id,
            "switchyard.priority": req.priority, "gen_ai.usage.input_tokens": len(req.prompt_token_ids)})

    def admitted(self, recv_span, request_id: str, model: str, prompt_tokens: int) -> None:
        ctx = propagation.context_of(recv_span)
        queue = tracing.tracer.start_span(tracing.BATCHER_QUEUE, context=ctx)
        recv_span.end()
        r = _Req(ctx, queue, model, prompt_tokens, propagation.traceparent_of(recv_span))
        r.tp = propagation.traceparent_of(queue)
        self.reqs[request_id] = r

    @staticmethod
    def rejected(recv_span, reason: str, message: str) -> None:
        from opentelemetry.trace import Status, StatusCode
        recv_span.set_attribute("switchyard.rejection_reason", reason)
        recv_span.set_status(Status(StatusCode.ERROR, message))
        recv_span.end()

    # ---- per step ------------------------------------------------------------------------------
    def step_context(self, plan) -> tuple[str, list[str]]:
        """First-schedule bookkeeping, then (parent traceparent, link traceparents) for worker.step."""
        reqs = self.reqs
        parent = ""
        links: list[str] = []
        for nr in plan.new_requests:
            r = reqs.get(nr.request_id)
            if r is None:
                continue
            if r.phase == QUEUED:
                r.span.end()
                r.span = tracing.tracer.start_span(tracing.BATCHER_PREFILL, context=r.ctx, attributes={
                    "gen_ai.usage.input_tokens": r.prompt_tokens,
                    "switchyard.cached_tokens": nr.num_computed_tokens})
                r.phase = PREFILL
                r.tp = propagation.traceparent_of(r.span)
            r.target = len(nr.token_ids)
            r.planned = nr.num_computed_tokens + nr.num_new_tokens
            if not parent and r.phase == PREFILL:
                parent = r.tp
            links.append(r.tp)
        for rr in plan.running:
            r = reqs.get(rr.request_id)
            if r is None:
                continue
            if r.phase == PREFILL:
                if r.planned >= r.target:           # a decode planned before its first token landed
                    parent = parent or r.recv_tp
                    links.append(r.recv_tp)
                    continue
                r.planned += rr.num_new_tokens
                if not parent:                      # a chunked prefill's later chunks
                    parent = r.tp
            links.append(r.tp)
        if not parent and links:
            parent = links[0]
        return parent, links

    def output(self, o, cost_usd: float = 0.0) -> None:
        """After a step: first token ends prefill and starts decode; finishing ends decode."""
        r = self.reqs.get(o.request_id)
        if r is None:
            return
        if r.phase == PREFILL:
            r.span.add_event(tracing.FIRST_TOKEN_EVENT)
            r.span.end()
            r.span = tracing.tracer.start_span(tracing.BATCHER_DECODE, context=r.ctx)
            r.phase = DECODE
            r.tp = propagation.traceparent_of(r.span)
        if o.finished:
            del self.reqs[o.request_id]
            r.span.set_attributes({"gen_ai.usage.input_tokens": o.num_prompt_tokens,
                                   "gen_ai.usage.output_tokens": o.num_output_tokens,
                                   "gen_ai.response.finish_reasons": (o.finish_reason or "",),
                                   "switchyard.cached_tokens": o.num_cached_tokens,
                                   "switchyard.cost_usd": cost_usd})
            r.span.end()

    # ---- abnormal ends -------------------------------------------------------------------------
    def abort(self, request_id: str, why: str = "cancelled") -> None:
        r = self.reqs.pop(request_id, None)
        if r is not None:
            r.span.set_attribute("switchyard.aborted", why)
            r.span.end()

    def fail_all(self, why: str) -> None:
        from opentelemetry.trace import Status, StatusCode
        for r in self.reqs.values():
            r.span.set_status(Status(StatusCode.ERROR, why))
            r.span.end()
        self.reqs.clear()
