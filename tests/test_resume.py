"""EngineCore resume: a migrated request continues after the tokens another replica streamed
(BatchRequest.resume_token_ids, issue 16). Real SmolLM2 weights, in process.

The continuation must join what the client already has without a seam: the same tokens, the same text
(the detokenizer's held-back text included), max_tokens and stop strings counted across the boundary,
and a seeded sampled request draws the same tokens it would have drawn undisturbed.
"""
from __future__ import annotations

import pytest

from batcher.engine import Engine
from workers.engine import EngineConfig, InvalidRequestError, SamplingParams

PROMPT = "Once upon a time, in a small village by the sea,"


@pytest.fixture(scope="module")
def eng(smollm2):
    return Engine(smollm2, EngineConfig(num_kv_blocks=256, max_num_batched_tokens=256))


def run(eng: Engine, rid: str, sampling: SamplingParams, resume: list[int] | None = None):
    """(per-output [(token, text)], finish_reason, last output) of one request run to completion."""
    ids = eng.encode_prompt(PROMPT)
    eng.core.add_request(rid, ids, sampling, resume_token_ids=resume)
    steps, last = [], None
    while last is None:
        for o in eng.step():
            if o.request_id != rid:
                continue
            steps.append((o.new_token_ids[0], o.new_text))
            if o.finished:
                last = o
    return steps, last.finish_reason, last


def greedy(max_tokens: int = 16, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


@pytest.mark.parametrize("k", [1, 5, 15])
def test_resumed_greedy_run_continues_the_same_tokens_and_text(eng, k):
    full, reason, _ = run(eng, f"full-{k}", greedy())
    tokens = [t for t, _ in full]
    got, reason2, last = run(eng, f"resumed-{k}", greedy(), resume=tokens[:k])
    # Only the tokens after the k already streamed come out, and max_tokens counts all of them.
    assert [t for t, _ in got] == tokens[k:]
    assert reason == reason2 == "length"
    assert last.num_output_tokens == 16 and last.num_prompt_tokens == len(eng.encode_prompt(PROMPT))
    # The client's text (the first k outputs' text) + the continuation = the undisturbed text.
    client_text = "".join(x for _, x in full[:k])
    assert client_text + "".join(x for _, x in got) == "".join(x for _, x in full)


def test_a_stop_string_across_the_boundary_is_found(eng):
    full, _, _ = run(eng, "nostop", greedy(24))
    text = "".join(x for _, x in full)
    k = 8
    cut = len("".join(x for _, x in full[:k]))   # the client has this much text after k tokens
    stop = text[cut - 3:cut + 3]                 # begins in the streamed text, ends after it
    assert len(stop) == 6 and text.find(stop) == cut - 3, "pick a stop string that occurs once"
    stopped, reason, _ = run(eng, "stop", greedy(24, stop=[stop]))
    expected = text[:cut - 3]
    assert reason == "stop" and "".join(x for _, x in stopped) == expected
    # Resumed after k tokens of the stop run: the held-back start of the stop string is held back
    # again, and the stop is found across the boundary.
    client_text = "".join(x for _, x in stopped[:k])
    got, reason2, _ = run(eng, "stop-resumed", greedy(24, stop=[stop]), resume=[t for t, _ in stopped[:k]])
    assert reason2 == "stop"
    assert client_text + "".join(x for _, x in got) == expected


def test_a_seeded_sampled_request_draws_the_same_continuation(eng):
    sp = lambda: SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)  # noqa: E731
    full, _, _ = run(eng, "seeded", sp())
    tokens = [t for t, _ in full]
    got, _, _ = run(eng, "seeded-resumed", sp(), resume=tokens[:4])
    assert [t for t, _ in got] == tokens[4:]


def test_nothing_left_to_generate_is_refused(eng):
    ids = eng.encode_prompt(PROMPT)
    with pytest.raises(InvalidRequestError, match="resume_token_ids"):
        eng.core.add_request("done", ids, greedy(4), resume_token_ids=[1, 2, 3, 4])
    assert "done" not in eng.core.scheduler.requests
