"""/metrics of every service, scraped and parsed with prometheus_client's parser; counts match."""
from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos.switchyard.v1 import inference_pb2_grpc
from services.cli import status_dict
from telemetry import metrics as M
from tests.e2e.conftest import channel, collect, gen_request
from tests.telemetry.conftest import LONG_PROMPT

N, MAX_TOKENS = 4, 3


def scrape(addr: str) -> dict:
    """{(family, sample name, frozenset(labels)): value}"""
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=10).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(fam.name, s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(samples: dict, sample_name: str, **match) -> float:
    return sum(v for (_, name, labels), v in samples.items()
               if name == sample_name and all((k, val) in labels for k, val in match.items()))


def scrape_all(endpoints: dict) -> dict:
    return {name: scrape(addr) for name, addr in endpoints.items()}


def settled(endpoints: dict) -> dict:
    """A scrape after the token counters stopped moving: they follow the batchers' heartbeat (0.5 s), so
    an earlier test's last tokens can land after this test's first scrape (seen once in CI: 16 == 4 * 3)."""
    batchers = [n for n in endpoints if n.startswith("batcher-")]
    tokens = lambda snap: sum(total(snap[b], M.GENERATION_TOKENS + "_total") for b in batchers)  # noqa: E731
    snap = scrape_all(endpoints)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(1.2)                 # two heartbeats
        again = scrape_all(endpoints)
        if tokens(again) == tokens(snap):
            return again
        snap = again
    return snap


def test_metrics_count_the_requests_sent(traced_stack):
    st = status_dict(traced_stack.router)
    endpoints = st["metrics"]       # `switchyard status --json` shows every service's /metrics
    assert set(endpoints) == {"router", "kv_manager", "worker-w0", "worker-w1", "batcher-w0", "batcher-w1"}
    before = settled(endpoints)

    async def main():
        async with channel(traced_stack.router) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            reqs = [gen_request(LONG_PROMPT + f" ({i})", max_tokens=MAX_TOKENS, request_id=f"metrics-{i}", priority=7)
                    for i in range(N)]
            for r in reqs:
                r.sampling.ignore_eos = True      # exactly MAX_TOKENS each
            return await asyncio.gather(*(collect(stub, r) for r in reqs))
    results = asyncio.run(main())
    usages = [resps[-1].usage for _, _, resps in results]
    assert all(u.completion_tokens == MAX_TOKENS and u.cost_usd > 0 for u in usages)

    delta = lambda svc, name, **kw: total(after[svc], name, **kw) - total(before[svc], name, **kw)  # noqa: E731
    batchers = [n for n in endpoints if n.startswith("batcher-")]
    deadline = time.monotonic() + 60
    while True:   # token counters follow the heartbeat (0.5 s): wait until one has carried them
        after = scrape_all(endpoints)
        gen = sum(delta(b, M.GENERATION_TOKENS + "_total") for b in batchers)
        prompt = sum(delta(b, M.PROMPT_TOKENS + "_total") for b in batchers)
        if (gen >= N * MAX_TOKENS and prompt >= sum(u.prompt_tokens for u in usages)) or time.monotonic() > deadline:
            break
        time.sleep(0.3)

    # router: requests, TTFT / E2E / TPOT histograms (labels model, worker, priority), GenAI names
    assert delta("router", M.REQUESTS + "_total", priority="7", finish_reason="length") == N
    assert delta("router", M.TTFT + "_count", priority="7", model="smollm2-135m") == N
    assert delta("router", M.E2E + "_count", priority="7") == N
    assert delta("router", M.TPOT + "_count", priority="7") == N
    assert delta("router", M.ITL + "_count", priority="7") == N * (MAX_TOKENS - 1)
    assert delta("router", M.GENAI_TTFT + "_count", gen_ai_request_model="smollm2-135m") == N
    assert delta("router", M.GENAI_DURATION + "_count") == N
    # batchers: finished requests, queue/prefill histograms, tokens, cost
    assert sum(delta(b, M.BATCHER_FINISHED + "_total", priority="7") for b in batchers) == N
    assert sum(delta(b, M.QUEUE_TIME + "_count", priority="7") for b in batchers) == N
    assert sum(delta(b, M.PREFILL_TIME + "_count", priority="7") for b in batchers) == N
    assert sum(delta(b, M.GENERATION_TOKENS + "_total") for b in batchers) == N * MAX_TOKENS
    assert sum(delta(b, M.PROMPT_TOKENS + "_total") for b in batchers) == sum(u.prompt_tokens for u in usages)
    # Cost: every engine step's cost is split over the tokens it computed, so the requests' shares add up
    # to the busy-time cost the batchers counted (these were the only requests in those steps).
    cost = sum(delta(b, M.COST_TOTAL + "_total") for b in batchers)
    assert cost > 0 and sum(u.cost_usd for u in usages) == pytest.approx(cost, rel=1e-6)
    for b in batchers:
        mine = [u.cost_usd for u in usages if f"batcher-{u.worker_id}" == b]
        assert sum(mine) == pytest.approx(delta(b, M.COST_TOTAL + "_total"), rel=1e-6, abs=1e-15), b
    for b in batchers:
        assert total(after[b], M.GPU_PRICE) > 0
        assert total(after[b], M.KV_USAGE) >= 0 and (M.REQUESTS_WAITING, M.REQUESTS_WAITING, frozenset(
            {("model", "smollm2-135m"), ("worker", b.split("-")[1])})) in after[b]
    assert any(total(after[b], M.COST_PER_1K) > 0 for b in batchers)
    # workers: one step-duration observation per engine step
    steps = sum(delta(w, M.STEP_TIME + "_count") for w in endpoints if w.startswith("worker-"))
    assert steps >= MAX_TOKENS
    # kv index: the router asked it (two workers: a routing choice to make)
    assert delta("kv_manager", M.KV_MATCHES + "_total") >= N
