"""One request = one trace across router, kv index, NATS, batcher and worker (spans via OTLP)."""
from __future__ import annotations

import secrets

from telemetry import tracing
from tests.telemetry.conftest import generate as _generate

SERVER, CLIENT, PRODUCER, CONSUMER = 2, 3, 4, 5   # OTLP SpanKind


def _trace_complete(trace_id: str, steps: int = 1):
    def pred(spans):
        names = [s.name for s in spans if s.trace_id == trace_id]
        return ({tracing.ROUTER_GENERATE, tracing.BATCHER_DECODE, tracing.KV_INDEX_MATCH} <= set(names)
                and names.count(tracing.WORKER_STEP) >= steps)
    return pred


def _by_name(spans, trace_id):
    out = {}
    for s in spans:
        if s.trace_id == trace_id:
            out.setdefault(s.name, []).append(s)
    return out


def _fence(stack, sink, worker_id: str) -> None:
    """Return once every worker.step that `worker_id` ran so far has reached the sink: a later request on
    that worker, and its own worker.step spans exported. One worker runs its steps one after another and
    its batch span processor exports them in the order they ended, so nothing that ended before is still
    on its way."""
    for k in range(10):
        rid = f"fence-{secrets.token_hex(4)}-{k}"
        resps = _generate(stack.router, rid, max_tokens=2)     # same prompt: routed to the prefix holder
        spans = sink.wait_for(lambda ss: any(x.name == tracing.ROUTER_GENERATE
                                             and x.attributes.get("switchyard.request_id") == rid for x in ss),
                              timeout=60)
        if resps[0].worker_id == worker_id:
            trace = next(x.trace_id for x in spans if x.name == tracing.ROUTER_GENERATE
                         and x.attributes.get("switchyard.request_id") == rid)
            sink.wait_for(_trace_complete(trace), timeout=60)
            return
    raise AssertionError(f"no fence request landed on {worker_id}")


def test_client_traceparent_is_continued_across_every_service(traced_stack, otlp_sink):
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    resps = _generate(traced_stack.router, "chain-1", metadata=(("traceparent", f"00-{trace_id}-{client_span}-01"),))
    assert resps[-1].usage.completion_tokens == 4
    otlp_sink.wait_for(_trace_complete(trace_id, steps=4), timeout=60)
    _fence(traced_stack, otlp_sink, resps[0].worker_id)   # a fifth worker.step would have been exported now
    spans = otlp_sink.snapshot()
    s = _by_name(spans, trace_id)
    one = lambda name: s[name][0]  # noqa: E731

    # Every service contributed to the one trace.
    assert {x.service for xs in s.values() for x in xs} == {
        "switchyard-router", "switchyard-kv-manager", "switchyard-batcher", "switchyard-worker"}
    gen = one(tracing.ROUTER_GENERATE)
    assert gen.parent_id == client_span, "the client's traceparent must be the parent of router.generate"
    assert otlp_sink.kinds[gen.span_id] == SERVER
    assert any(n == tracing.FIRST_TOKEN_EVENT for n, _ in gen.events)
    assert gen.attributes["gen_ai.request.model"] == "smollm2-135m"
    assert gen.attributes["gen_ai.usage.output_tokens"] == 4
    for name in (tracing.ROUTER_VALIDATE, tracing.ROUTER_TOKENIZE, tracing.ROUTER_ROUTE, tracing.ROUTER_PUBLISH):
        assert one(name).parent_id == gen.span_id, name
    route, match_c, match_s = one(tracing.ROUTER_ROUTE), one(tracing.ROUTER_KV_MATCH), one(tracing.KV_INDEX_MATCH)
    assert match_c.parent_id == route.span_id and otlp_sink.kinds[match_c.span_id] == CLIENT
    assert match_s.parent_id == match_c.span_id and otlp_sink.kinds[match_s.span_id] == SERVER
    assert match_s.service == "switchyard-kv-manager"
    pub, recv = one(tracing.ROUTER_PUBLISH), one(tracing.BATCHER_RECEIVE)
    assert otlp_sink.kinds[pub.span_id] == PRODUCER and otlp_sink.kinds[recv.span_id] == CONSUMER
    assert recv.parent_id == pub.span_id and recv.service == "switchyard-batcher"
    assert recv.attributes["messaging.destination.name"] == f"sy.req.{resps[0].worker_id}"
    queue, prefill, decode = one(tracing.BATCHER_QUEUE), one(tracing.BATCHER_PREFILL), one(tracing.BATCHER_DECODE)
    assert queue.parent_id == prefill.parent_id == decode.parent_id == recv.span_id
    assert queue.end <= prefill.start + 1_000_000 and prefill.end <= decode.start + 1_000_000
    assert any(n == tracing.FIRST_TOKEN_EVENT for n, _ in prefill.events)
    assert decode.attributes["gen_ai.usage.output_tokens"] == 4
    assert decode.attributes["switchyard.cost_usd"] > 0
    # worker.step: one per engine step (4 tokens -> 1 prefill step + 3 decode steps), children of
    # this request's prefill/decode span and linked to it; batch size and tokens on each. A decode
    # step the batcher planned before the first token landed hangs off batcher.receive instead.
    steps = s[tracing.WORKER_STEP]
    assert len(steps) == 4, [(x.attributes, x.parent_id) for x in steps]
    assert {x.parent_id for x in steps} <= {prefill.span_id, decode.span_id, recv.span_id}
    assert all(x.service == "switchyard-worker" and x.attributes["switchyard.batch_size"] >= 1
               and x.attributes["switchyard.num_tokens"] >= 1 for x in steps)
    assert all(x.parent_id in x.links for x in steps)
    assert sum(1 for x in steps if x.parent_id == prefill.span_id) == 1


def test_request_without_traceparent_starts_a_trace_at_the_router(traced_stack, otlp_sink):
    resps = _generate(traced_stack.router, "chain-2", max_tokens=2)
    assert resps[-1].finish_reason
    spans = otlp_sink.wait_for(lambda ss: any(
        x.name == tracing.ROUTER_GENERATE and x.attributes.get("switchyard.request_id") == "chain-2" for x in ss),
        timeout=60)
    gen = next(x for x in spans if x.name == tracing.ROUTER_GENERATE
               and x.attributes.get("switchyard.request_id") == "chain-2")
    assert gen.parent_id == ""
    spans = otlp_sink.wait_for(_trace_complete(gen.trace_id), timeout=60)
    assert {x.service for x in spans if x.trace_id == gen.trace_id} >= {"switchyard-router", "switchyard-batcher",
                                                                        "switchyard-worker"}
