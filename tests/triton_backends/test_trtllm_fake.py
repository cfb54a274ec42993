"""The TensorRT-LLM adapter against a fake with the LLM API's shapes, and the pass-through batcher
(admission, priorities, cancel, KV events into the index) with an in-memory bus. No processes."""
from __future__ import annotations

import asyncio

import pytest

from common.config import StackConfig
from kv_manager.block_hash import block_hashes
from kv_manager.event_codec import kv_events_from_proto
from kv_manager.index import KvIndex
from protos.switchyard.v1 import bus_pb2
from workers.backends.base import BackendMissingError, BackendRequest
from workers.backends.factory import make_backend
from workers.backends.trtllm import TrtLlmBackend, to_trt_sampling
from workers.engine.config import EngineConfig
from workers.engine.sampling_params import SamplingParams

FAKE = "tests.triton_backends.fake_trtllm"


def run(coro):
    return asyncio.run(coro)


async def until(cond, timeout: float = 30.0):
    """Poll cond() on the running loop until true (the bus is in memory: no clock to race)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met"
        await asyncio.sleep(0.01)


def test_missing_package_is_a_clear_error():
    b = make_backend("tensorrt-llm", "", "meta-llama/Llama-3.1-8B")
    with pytest.raises(BackendMissingError, match="'tensorrt_llm', which is not installed") as e:
        run(b.start())
    assert "tensorrt-llm" in e.value.message and e.value.package == "tensorrt_llm"


def test_streaming_relays_differences_and_finishes():
    async def go():
        b = TrtLlmBackend("m", module=FAKE)
        await b.start()
        assert b.llm.kv_cache_config.event_buffer_max_size > 0 and b.llm.kv_cache_config.enable_block_reuse
        chunks = [c async for c in b.generate(BackendRequest("r1", "hi", [1, 2, 3], SamplingParams(max_tokens=5)))]
        return b, chunks

    b, chunks = run(go())
    assert "".join(c.text for c in chunks) == "t0 t1 t2 t3 t4 "
    assert sum((c.token_ids for c in chunks), []) == [1000, 1001, 1002, 1003, 1004]
    assert chunks[-1].finish_reason == "length" and chunks[-1].prompt_tokens == 3
    assert b.llm.requests[0][0] == [1, 2, 3], "the router's token ids are the prompt"


def test_sampling_mapping():
    import importlib
    trt = importlib.import_module(FAKE)
    sp = to_trt_sampling(trt, SamplingParams(max_tokens=7, temperature=0.5, top_k=0, top_p=0.9, seed=11,
                                             stop=["\n"], stop_token_ids=[2], ignore_eos=True,
                                             repetition_penalty=1.1, presence_penalty=0.2, logprobs=True))
    assert (sp.max_tokens, sp.temperature, sp.top_k, sp.top_p, sp.seed) == (7, 0.5, None, 0.9, 11)
    assert (sp.stop, sp.stop_token_ids, sp.ignore_eos, sp.logprobs) == (["\n"], [2], True, 1)
    assert (sp.repetition_penalty, sp.presence_penalty, sp.min_p) == (1.1, 0.2, None)


def test_closing_the_stream_aborts_the_request():
    async def go():
        b = TrtLlmBackend("m", module=FAKE)
        await b.start()
        gen = b.generate(BackendRequest("r1", "hi", [1, 2], SamplingParams(max_tokens=50)))
        await gen.__anext__()
        await gen.aclose()
        return b

    assert run(go()).llm.aborted == [1]


class FakeNC:
    """Just enough of nats.NATS: subscribe callbacks and a log of publishes."""

    def __init__(self):
        self.subs, self.published = {}, []

    async def subscribe(self, subject, cb):
        self.subs[subject] = cb
        return self

    async def unsubscribe(self):
        pass

    async def publish(self, subject, data, headers=None):
        self.published.append((subject, data))

    async def deliver(self, subject, data):
        class M:
            pass
        m = M()
        m.subject, m.data, m.reply = subject, data, ""
        cb = self.subs.get(subject) or self.subs.get(subject.rsplit(".", 1)[0] + ".*")
        await cb(m)


def _req(rid, prio=0, ids=(1, 2, 3, 4, 5, 6, 7, 8, 9), max_tokens=3):
    r = bus_pb2.BatchRequest(request_id=rid, prompt_token_ids=list(ids), priority=prio, reply_subject=f"sy.tok.{rid}",
                             prompt_text="x")
    r.sampling.max_tokens = max_tokens
    r.sampling.temperature = 0.0
    return r.SerializeToString()


def _chunks(nc, rid):
    return [bus_pb2.TokenChunk.FromString(d) for s, d in nc.published if s == f"sy.tok.{rid}"]


def test_passthrough_admission_priority_cancel_and_kv_events():
    from batcher.passthrough import PassthroughBatcher

    async def go():
        cfg = StackConfig(heartbeat_interval_s=0.05, engine=EngineConfig(block_size=4))
        backend = TrtLlmBackend("m", module=FAKE)
        nc = FakeNC()
        pt = PassthroughBatcher(cfg, "w9", nc, backend, max_concurrency=1, max_waiting=2)
        await pt.start()
        backend.llm.step_s = 0.02
        await nc.deliver("sy.req.w9", _req("first"))                # runs at once (one seat)
        await nc.deliver("sy.req.w9", _req("low", prio=-5))          # waits
        await nc.deliver("sy.req.w9", _req("high", prio=50))         # waits, but goes before "low"
        await nc.deliver("sy.req.w9", _req("over"))                  # queue full: rejected at once
        rej = _chunks(nc, "over")
        assert rej and rej[0].error == bus_pb2.CHUNK_ERROR_QUEUE_FULL and rej[0].retry_after_ms > 0
        await nc.deliver("sy.req.w9", _req("long", prio=100, max_tokens=500))
        assert _chunks(nc, "long")[0].error == bus_pb2.CHUNK_ERROR_QUEUE_FULL
        await until(lambda: all(any(c.finish_reason for c in _chunks(nc, r)) for r in ("first", "low", "high")))
        order = [backend.llm.requests[i][1].max_tokens for i in range(3)]
        assert order == [3, 3, 3]
        finish_seq = [next(i for i, (s, d) in enumerate(nc.published)
                           if s == f"sy.tok.{r}" and bus_pb2.TokenChunk.FromString(d).finish_reason)
                      for r in ("first", "high", "low")]
        assert finish_seq == sorted(finish_seq), "high priority must run before low"
        last = _chunks(nc, "high")[-1]
        assert last.usage.completion_tokens == 3 and last.usage.worker_id == "w9"
        # cancel a running request (it has streamed a token): the backend aborts it
        await nc.deliver("sy.req.w9", _req("victim", max_tokens=500))
        await until(lambda: _chunks(nc, "victim"))
        await nc.deliver("sy.cancel.victim", bus_pb2.Cancel(request_id="victim").SerializeToString())
        await until(lambda: 4 in backend.llm.aborted)
        assert not any(c.finish_reason for c in _chunks(nc, "victim"))
        # the KV loop and heartbeats run: wait for a heartbeat that shows every prompt's cached blocks
        n_before = len(nc.published)

        def latest_hb():
            beats = [bus_pb2.Heartbeat.FromString(d) for s, d in nc.published[n_before:] if s == "sy.hb.w9"]
            return beats[-1] if beats else None
        await until(lambda: (hb := latest_hb()) is not None and hb.num_free_blocks == 48)
        hb = latest_hb()
        await pt.stop()
        return nc, hb

    nc, hb = run(go())
    assert hb.healthy and hb.num_blocks == 64 and hb.num_free_blocks == 48 and hb.block_size == 4
    index = KvIndex()
    for s, d in nc.published:
        if s == "sy.kv.w9":
            for ev in kv_events_from_proto(bus_pb2.KvEventBatch.FromString(d)):
                index.apply("w9", ev)
    # The router hashes a prompt with our chained hash; the index must know w9 caches its full blocks.
    assert index.match(block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 4)) == {"w9": 2}
