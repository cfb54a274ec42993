"""Speculative decoding through a real stack (issue 21): `switchyard up` with speculative_method = "ngram"
(prompt lookup, then the deployment's suffix cache; the batcher drafts, the worker verifies).

Greedy output over gRPC equals the in-process engine without speculation; the final chunk's usage
carries the request's drafts verified / accepted and its decode steps, relayed by the router
unchanged; the batcher's /metrics counts drafts per method and tokens per step per request."""
from __future__ import annotations

import asyncio
import urllib.request

import pytest

from bench.workloads import copy_heavy
from protos.switchyard.v1 import inference_pb2_grpc
from telemetry import metrics as M
from tests.e2e.conftest import channel, collect, gen_request, start_stack
from workers.engine.sampling_params import SamplingParams

MAX_TOKENS = 48
# A code edit and a RAG quote: their greedy answers copy long spans of the prompt.
PROMPTS = [s.prompt for s in copy_heavy(2, seed=0)]


@pytest.fixture(scope="module")
def spec_stack(tmp_path_factory):
    h = start_stack(tmp_path_factory.mktemp("spec"), workers=1,
                    engine={"speculative_method": "ngram", "num_speculative_tokens": 4})
    yield h
    leftovers = h.stop()
    assert not leftovers, f"processes outlived the stack stop: {leftovers}"


@pytest.fixture(scope="module")
def results(spec_stack):
    """Both prompts, one after the other (batch 1: the scheduler speculates whenever drafts exist)."""
    async def main():
        async with channel(spec_stack.router) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            return [await collect(stub, gen_request(p, max_tokens=MAX_TOKENS, request_id=f"spec-{i}"))
                    for i, p in enumerate(PROMPTS)]
    return asyncio.run(main())


def _scrape(h, child: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families
    text = urllib.request.urlopen(f"http://{h.state['metrics'][child]}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_greedy_stream_equals_the_engine_without_speculation(results, engine):
    refs = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    for (text, ids, resps), ref in zip(results, refs):
        assert ids == ref.token_ids
        assert text == ref.text
        # several tokens of one step travel in one chunk: fewer chunks than tokens once drafts are accepted
        assert sum(len(r.token_ids) for r in resps) == MAX_TOKENS


def test_final_usage_carries_the_speculation_counters(results):
    for text, ids, resps in results:
        u = resps[-1].usage
        assert u.completion_tokens == MAX_TOKENS
        assert u.spec_proposed_tokens > 0, "a copy-heavy prompt must get drafts"
        assert 0 < u.spec_accepted_tokens <= u.spec_proposed_tokens
        # every token after the first is a decode step's own token or an accepted draft
        assert u.decode_steps + u.spec_accepted_tokens >= u.completion_tokens - 1
        assert 0 < u.decode_steps < u.completion_tokens - 1
        # the client saw the accepted drafts arrive with their step's token: fewer chunks than tokens
        assert len([r for r in resps if r.token_ids]) < u.completion_tokens


def test_batcher_metrics_count_drafts_per_method_and_tokens_per_step(spec_stack, results):
    usage = [r[2][-1].usage for r in results]
    samples = _scrape(spec_stack, "batcher-w0")

    def total(name: str) -> float:
        return sum(v for (n, _), v in samples.items() if n == name)
    proposed, accepted = total(f"{M.SPEC_PROPOSED}_total"), total(f"{M.SPEC_ACCEPTED}_total")
    rows, emitted = total(f"{M.SPEC_VERIFY_ROWS}_total"), total(f"{M.SPEC_EMITTED}_total")
    # the warm-up and these requests are all this stack has served: at least these requests' drafts
    assert proposed >= sum(u.spec_proposed_tokens for u in usage) > 0
    assert accepted >= sum(u.spec_accepted_tokens for u in usage) > 0
    assert 0 < accepted <= proposed
    assert rows > 0 and emitted == accepted + rows   # each verification row emits its accepted drafts + 1
    methods = {dict(labels)["method"] for (n, labels), v in samples.items() if n == f"{M.SPEC_PROPOSED}_total" and v}
    assert methods and methods <= {"ngram", "prompt_lookup", "suffix"}, methods   # the configured method (or its parts)
    # tokens per step per request: one observation per finished request, above 1 with drafts accepted
    count = total(f"{M.TOKENS_PER_STEP}_count")
    assert count >= len(results)
    assert total(f"{M.TOKENS_PER_STEP}_sum") / count > 1.0
