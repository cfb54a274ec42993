"""The OpenAI-compatible HTTP front door (services/openai_http.py), driven by the official `openai` client
against a real stack (`switchyard up --http-port 0`, auth required): chat and completion streaming,
sampling parameters, embeddings, errors in OpenAI's shape, and the Batch API (/v1/files + /v1/batches)
over the router's durable bulk jobs, bad input reported per line."""
from __future__ import annotations

import io
import json
import time

import pytest

from tests.e2e.conftest import start_stack

openai = pytest.importorskip("openai")

MODEL = "smollm2-135m"
EMBED = "all-minilm-l6-v2"
TOKEN = "sk-openai-test"
TINY = "sk-tiny-quota"   # a tenant with 200 tokens a minute: the third request of 64 + prompt is over it
MAX_FILE = 64 * 1024


@pytest.fixture(scope="module")
def http_stack(tmp_path_factory):
    h = start_stack(tmp_path_factory.mktemp("openai"), workers=1, embedding_workers=1, http_port=0,
                    batch_max_file_bytes=MAX_FILE, batch_ack_wait_s=5.0, batch_item_timeout_s=60.0, auth="required",
                    tenants={"acme": {"tokens": [TOKEN]}, "tiny": {"tokens": [TINY], "tokens_per_minute": 200}})
    yield h
    leftovers = h.stop()
    assert not leftovers, f"processes outlived the stack stop: {leftovers}"


@pytest.fixture(scope="module")
def client(http_stack):
    return openai.OpenAI(base_url=http_stack.state["http"], api_key=TOKEN, max_retries=0, timeout=120.0)


def chat(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def test_models_lists_the_served_model(client):
    assert MODEL in [m.id for m in client.models.list().data]


def test_chat_completion_streams_as_server_sent_events_with_usage_last(client):
    stream = client.chat.completions.create(model=MODEL, messages=chat("Name three colours."), max_tokens=12,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text and finishes in (["length"], ["stop"])
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens <= 12
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


def test_completion_stream_equals_the_non_streamed_greedy_answer(client):
    kw = dict(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    full = client.completions.create(**kw)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices)
    assert full.choices[0].text == streamed and full.usage.completion_tokens <= 8
    assert full.choices[0].finish_reason in ("length", "stop") and full.object == "text_completion"


def test_seed_temperature_top_p_and_stop_are_honoured(client):
    kw = dict(model=MODEL, messages=chat("Write one sentence about rivers."), max_tokens=16, temperature=1.0,
              top_p=0.9, seed=1234)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b   # seeded sampling repeats
    greedy = client.completions.create(model=MODEL, prompt="One, two, three, four,", max_tokens=12,
                                       temperature=0).choices[0].text
    words = [w for w in greedy.split() if len(w) > 2]
    assert words, greedy
    stop = words[-1]
    r = client.completions.create(model=MODEL, prompt="One, two, three, four,", max_tokens=12, temperature=0,
                                  stop=[stop])
    assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].text
    assert greedy.startswith(r.choices[0].text)


def test_embeddings(client):
    if EMBED not in [m.id for m in client.models.list().data]:
        pytest.skip("no embedding model in this stack (Inference/Embed serves models of kind 'embedding')")
    e = client.embeddings.create(model=EMBED, input=["a red apple", "a green pear"])
    assert [d.index for d in e.data] == [0, 1] and len(e.data[0].embedding) == 384
    assert abs(sum(x * x for x in e.data[0].embedding) - 1.0) < 1e-3 and e.usage.prompt_tokens > 0


def test_embeddings_as_a_bulk_job(client):
    if EMBED not in [m.id for m in client.models.list().data]:
        pytest.skip("no embedding model in this stack")
    data = "\n".join(json.dumps({"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
                                 "body": {"model": EMBED, "input": [f"text number {i}", "another"]}})
                      for i in range(6)).encode()
    f = client.files.create(file=("emb.jsonl", io.BytesIO(data)), purpose="batch")
    b = wait_batch(client, client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings",
                                                 completion_window="24h").id)
    assert b.status == "completed" and b.request_counts.completed == 6
    out = [json.loads(x) for x in client.files.content(b.output_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in out) == [f"e{i}" for i in range(6)]
    assert all(len(r["response"]["body"]["data"]) == 2 and len(r["response"]["body"]["data"][0]["embedding"]) == 384
               for r in out)


def test_errors_have_openai_shape_and_http_status(http_stack, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=chat("hi"))
    assert e.value.body["code"] == "model_not_found" and "no-such-model" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=chat("hi"), extra_body={"frobnicate": 1})
    assert e.value.body["param"] == "frobnicate" and "Unrecognized request argument" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=chat("hi"), n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", temperature=7)
    assert e.value.body["param"] == "temperature"
    stranger = openai.OpenAI(base_url=http_stack.state["http"], api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        stranger.chat.completions.create(model=MODEL, messages=chat("hi"))
    assert e.value.body["type"] == "authentication_error"


def test_quota_refusal_is_429_with_retry_after(http_stack):
    tiny = openai.OpenAI(base_url=http_stack.state["http"], api_key=TINY, max_retries=0)
    with pytest.raises(openai.RateLimitError) as e:
        for _ in range(5):
            tiny.completions.create(model=MODEL, prompt="Count slowly:", max_tokens=64)
    assert int(e.value.response.headers["retry-after"]) >= 1 and int(e.value.response.headers["retry-after-ms"]) > 0
    assert e.value.body["type"] == "rate_limit_error" and "tokens per minute" in e.value.body["message"]


def test_invalid_utf8_and_json_bodies_are_400(http_stack):
    import httpx2 as httpx
    url = http_stack.state["http"] + "/chat/completions"
    headers = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    for raw in (b'{"model": "\xff"}', b"{not json"):
        r = httpx.post(url, content=raw, headers=headers, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text


def batch_line(cid: str, content: str, **body) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": MODEL, "messages": chat(content), "max_tokens": 2, **body}})


def wait_batch(client, batch_id: str, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    b = client.batches.retrieve(batch_id)
    while b.status not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"batch still {b.status}: {b.request_counts}"
        time.sleep(0.5)
        b = client.batches.retrieve(batch_id)
    return b


def test_batch_through_files_and_batches_runs_every_good_line_once(client):
    good = [batch_line(f"req-{i}", f"Say the number {i}.") for i in range(24)]
    bad = {2: "{not json",                                                          # malformed JSON
           5: batch_line("wrong-model", "hi", model="no-such-model"),             # unknown model
           7: json.dumps({"custom_id": "x1", "method": "POST", "url": "/v1/chat/completions", "body": {},
                          "priority": 3}),                                         # unknown line field
           9: batch_line("bad-field", "hi", frobnicate=True),                      # unknown body field
           11: batch_line("req-0", "duplicate id")}                                # duplicate custom_id
    lines = list(good)
    for at in sorted(bad):
        lines.insert(at - 1, bad[at])
    data = "\n".join(lines).encode() + b"\n\"\xff\xfe\"\n"                          # + a line of invalid UTF-8
    f = client.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                              metadata={"suite": "openai"})
    errors = {e.line: e for e in b.errors.data}
    assert set(errors) == {*bad, len(lines) + 1}, errors
    assert errors[2].code == "invalid_json" and errors[5].code == "model_not_found"
    assert errors[7].param == "priority" and errors[9].param == "body.frobnicate"
    assert errors[11].code == "duplicate_custom_id" and errors[len(lines) + 1].code == "invalid_encoding"
    b = wait_batch(client, b.id)
    assert b.status == "completed" and b.metadata == {"suite": "openai"}
    assert b.request_counts.completed == 24 and b.request_counts.total == 24 + len(errors)
    out = [json.loads(x) for x in client.files.content(b.output_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in out) == sorted(f"req-{i}" for i in range(24))
    for r in out:
        body = r["response"]["body"]
        assert r["response"]["status_code"] == 200 and body["object"] == "chat.completion"
        assert 1 <= body["usage"]["completion_tokens"] <= 2 and r["error"] is None
    extra = b.model_extra["x_switchyard"]
    assert extra["completion_tokens"] == sum(r["response"]["body"]["usage"]["completion_tokens"] for r in out)
    assert extra["pending"] == 0 and extra["cost_usd"] > 0
    assert b.id in [x.id for x in client.batches.list(limit=100).data]


def test_batch_cancel_ends_every_item_exactly_once(client):
    data = "\n".join(batch_line(f"c-{i}", f"Tell me about the number {i}.", max_tokens=24) for i in range(60))
    f = client.files.create(file=("cancel.jsonl", io.BytesIO(data.encode())), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert client.batches.cancel(b.id).status in ("cancelling", "cancelled")
    b = wait_batch(client, b.id)
    assert b.status == "cancelled"
    ids = []
    for fid in (b.output_file_id, b.error_file_id):
        if fid:
            ids += [json.loads(x)["custom_id"] for x in client.files.content(fid).text.splitlines()]
    assert sorted(ids) == sorted(f"c-{i}" for i in range(60))   # each once: a response or "cancelled"
    assert b.model_extra["x_switchyard"]["cancelled"] > 0


def test_file_and_batch_refusals(client):
    with pytest.raises(openai.APIStatusError) as e:
        client.files.create(file=("big.jsonl", io.BytesIO(b"x" * (MAX_FILE + 1))), purpose="batch")
    assert e.value.status_code == 413 and e.value.body["code"] == "file_too_large"
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    f = client.files.create(file=("one.jsonl", io.BytesIO(batch_line("a", "hi").encode())), purpose="batch")
    with pytest.raises(openai.BadRequestError) as e:
        client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="1h")
    assert e.value.body["param"] == "completion_window"
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_doesnotexist")
    only_bad = client.files.create(file=("bad.jsonl", io.BytesIO(b"{oops\n")), purpose="batch")
    b = client.batches.create(input_file_id=only_bad.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert b.status == "failed" and b.errors.data[0].line == 1


def test_batch_cli_submit_follows_progress_and_results_lists_each_item_once(http_stack, tmp_path):
    import subprocess
    import sys

    from tests.e2e.conftest import REPO
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(batch_line(f"cli-{i}", f"Hello {i}") for i in range(8)) + "\n{broken\n")
    base = [sys.executable, "-m", "services.cli", "batch", "--router", http_stack.router, "--token", TOKEN]
    sub = subprocess.run([*base, "submit", str(src), "--interval", "0.3"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.split()[0]
    assert "line 9: invalid_json" in sub.stderr and "8/8 completed" in sub.stderr
    res = subprocess.run([*base, "results", job_id], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert sorted(json.loads(x)["custom_id"] for x in res.stdout.splitlines()) == sorted(f"cli-{i}" for i in range(8))
    st = subprocess.run([*base, "status", job_id, "--json"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert json.loads(st.stdout)["counts"]["completed"] == 8
    ls = subprocess.run([*base, "list"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert job_id in ls.stdout
