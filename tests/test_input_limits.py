"""Limits on every input and the smaller items of issue 16 (items 5, 7, 8), without a stack.

The end-to-end checks (a real router refusing huge prompts, garbage bytes, long stop lists) are in
tests/e2e/test_limits.py.
"""
from __future__ import annotations

import socket

import grpc
import numpy as np
import pytest

from common.config import StackConfig
from protos.switchyard.v1 import common_pb2, inference_pb2
from router.validation import (
    RequestError,
    check_bus_size,
    check_limits,
    check_prompt_tokens,
    check_stop_token_ids,
    max_prompt_chars,
)


def _refusal(fn, *a) -> str:
    with pytest.raises(RequestError) as ei:
        fn(*a)
    assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return ei.value.message


def test_prompt_chars_default_from_the_context():
    cfg = StackConfig()
    assert max_prompt_chars(cfg, 512) == 512 * cfg.prompt_chars_per_token
    check_limits("a" * 512 * cfg.prompt_chars_per_token, [], common_pb2.SamplingParams(), cfg, 512)
    msg = _refusal(check_limits, "a" * 9000, [], common_pb2.SamplingParams(), cfg, 512)
    assert "9000 characters" in msg and "max_prompt_chars" in msg and "8192" in msg
    chat = [inference_pb2.ChatMessage(role="user", content="b" * 5000)] * 2
    assert "max_prompt_chars" in _refusal(check_limits, "", chat, common_pb2.SamplingParams(), cfg, 512)
    assert max_prompt_chars(StackConfig(max_prompt_chars=10), 512) == 10


def test_stop_lists_limits_name_the_key_and_value():
    cfg = StackConfig()
    msg = _refusal(check_limits, "hi", [], common_pb2.SamplingParams(stop=["x"] * 65), cfg, 512)
    assert "65 stop strings" in msg and "max_stop_strings" in msg
    msg = _refusal(check_limits, "hi", [], common_pb2.SamplingParams(stop=["é" * 40_000]), cfg, 512)
    assert "80000 bytes" in msg and "max_stop_bytes" in msg
    msg = _refusal(check_limits, "hi", [], common_pb2.SamplingParams(stop_token_ids=range(1025)), cfg, 512)
    assert "max_stop_token_ids" in msg
    check_stop_token_ids([0, 49151], 49152)
    for bad in (-1, 49152, 10**9):
        assert str(bad) in _refusal(check_stop_token_ids, [bad], 49152)


def test_prompt_tokens_and_bus_size():
    assert "max_prompt_tokens" in _refusal(check_prompt_tokens, 200, StackConfig(max_prompt_tokens=100), 512)
    assert "context" in _refusal(check_prompt_tokens, 512, StackConfig(), 512)
    check_bus_size(100, 100)
    msg = _refusal(check_bus_size, 101, 100)
    assert "101 bytes" in msg and "100 bytes" in msg


def test_router_never_publishes_over_the_connections_max_payload():
    from router.service import Router

    class Nc:
        max_payload = 1024
    r = Router(StackConfig(), Nc(), None, tokenizer_loader=lambda m: None)
    assert r._bus_limit() == 1024
    Nc.max_payload = 64 * 1024 * 1024   # the config's nats_max_payload is the lower one now
    assert r._bus_limit() == StackConfig().nats_max_payload
    r._tokenize_pool.shutdown()


def test_checked_deserializer_refuses_garbage_and_big_requests():
    from common.rpc import Refused, checked_deserializer
    d = checked_deserializer(inference_pb2.GenerateRequest.FromString, "GenerateRequest", 100)
    assert d(inference_pb2.GenerateRequest(prompt="hi").SerializeToString()).prompt == "hi"
    for data in (b"\xff\xff\xff garbage", b"\x1a\x02\xff\xfe"):
        r = d(data)
        assert isinstance(r, Refused) and "could not be decoded as GenerateRequest" in r.message
    r = d(b"\x1a\x7f" + b"a" * 127)
    assert isinstance(r, Refused) and "129 bytes" in r.message and "max_request_bytes" in r.message


def test_describe_drops_debug_error_string():
    from common.rpc import describe

    class Err(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return "worker went away"

        def __str__(self):
            return ('<AioRpcError of RPC that terminated with:\n\tstatus = StatusCode.UNAVAILABLE\n'
                    '\tdebug_error_string = "UNKNOWN:Error received from peer {file:...}"\n>')
    assert describe(Err()) == "UNAVAILABLE: worker went away"


def test_port_in_time_wait_counts_as_free():
    from common.ports import is_free
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as gRPC servers and nats-server do
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    assert not is_free(port)   # listening: taken
    cli = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    conn.close()               # the server side closes first: its port sits in TIME_WAIT
    cli.close()
    srv.close()
    assert is_free(port)


def test_triton_text_input_not_utf8_is_invalid_argument():
    from services.triton_front import TritonInputError, _scalar
    with pytest.raises(TritonInputError) as ei:
        _scalar(np.array([b"\xff\xfe"], dtype=object), "text_input", "r1", "m")
    assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT and "not valid UTF-8" in ei.value.message


def test_triton_stream_request_with_invalid_utf8_is_answered():
    """ModelStreamInfer used to leave such a request unanswered (the decode error killed its task)."""
    import asyncio

    from services import triton_front as tf

    front = tf.TritonFront.__new__(tf.TritonFront)

    async def known(name):
        return {"m"}
    front._known = known
    req = tf.pb.ModelInferRequest(model_name="m", id="r7")
    t = req.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    t.contents.bytes_contents.append(b"ok \xff\xfe")
    out: asyncio.Queue = asyncio.Queue()
    asyncio.run(front._stream_one(req, out))
    resp = out.get_nowait()
    assert "[request id: r7]" in resp.error_message and "not valid UTF-8" in resp.error_message


def test_checked_servicer_answers_invalid_argument_in_process():
    """add_checked_servicer keeps the methods served and refuses what does not decode or is too big."""
    import asyncio

    from common import rpc
    from protos.switchyard.v1 import inference_pb2_grpc

    class S(inference_pb2_grpc.InferenceServicer):
        async def Tokenize(self, r, c):
            return inference_pb2.TokenizeResponse(count=len(r.prompt))

        async def Generate(self, r, c):
            yield inference_pb2.GenerateResponse(text=r.prompt)

    refused = []

    async def main():
        srv = rpc.server()
        rpc.add_checked_servicer(inference_pb2_grpc.add_InferenceServicer_to_server, S(), srv, 100,
                                 on_refused=lambda m, r: refused.append(m))
        port = srv.add_insecure_port("127.0.0.1:0")
        await srv.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = inference_pb2_grpc.InferenceStub(ch)
                assert (await stub.Tokenize(inference_pb2.TokenizeRequest(prompt="abc"))).count == 3
                assert [r.text async for r in stub.Generate(inference_pb2.GenerateRequest(prompt="x"))] == ["x"]
                codes = []
                for call in (lambda: stub.Tokenize(inference_pb2.TokenizeRequest(prompt="a" * 200)),
                             lambda: ch.unary_unary("/switchyard.v1.Inference/Tokenize")(b"\xff\xff\xff"),
                             lambda: ch.unary_stream("/switchyard.v1.Inference/Generate")(b"\x1a\x02\xff\xfe").read()):
                    try:
                        await call()
                    except grpc.aio.AioRpcError as e:
                        codes.append((e.code(), e.details()))
                return codes
        finally:
            await srv.stop(0)

    codes = asyncio.run(main())
    assert [c for c, _ in codes] == [grpc.StatusCode.INVALID_ARGUMENT] * 3, codes
    assert "max_request_bytes" in codes[0][1] and "could not be decoded" in codes[1][1]
    assert refused == ["Tokenize", "Tokenize", "Generate"]


def test_tokenizing_runs_off_the_event_loop():
    """A slow tokenization (a long prompt) does not stop the router's loop: heartbeats and other
    streams go on meanwhile. A short prompt is encoded on the loop: it costs less than the hop."""
    import asyncio
    import threading
    import time

    from router.service import TOKENIZE_INLINE_CHARS, Router

    class SlowTok:
        vocab_size = 100
        threads: list[str] = []

        def encode(self, text):
            self.threads.append(threading.current_thread().name)
            if len(text) > TOKENIZE_INLINE_CHARS:
                time.sleep(0.5)   # holds its thread, as a long prompt would
            return [1, 2, 3]

    r = Router(StackConfig(), object(), None, tokenizer_loader=lambda m: SlowTok())

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1
        t = asyncio.create_task(ticker())
        ids, tok = await r._encode("m", "x" * (TOKENIZE_INLINE_CHARS + 1), [])
        t.cancel()
        short, _ = await r._encode("m", "x" * TOKENIZE_INLINE_CHARS, [])
        return ids, short, ticks, threading.current_thread().name

    ids, short, ticks, loop_thread = asyncio.run(main())
    r._tokenize_pool.shutdown()
    assert ids == [1, 2, 3] and ticks >= 10, ticks
    assert short == [1, 2, 3]
    assert SlowTok.threads[0] != loop_thread and SlowTok.threads[1] == loop_thread, SlowTok.threads


def test_triton_input_whose_contents_disagree_with_its_shape_is_invalid_argument():
    """Found by the 10,000-message fuzz run: 12 raw bytes for an INT32 `max_tokens` of shape [1] were
    read as its first element (1,127,204,941 tokens). Triton refuses such an input; so do we."""
    import struct

    from services import triton_front as tf
    req = tf.pb.ModelInferRequest(model_name="m", id="r9")
    req.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    req.inputs.add(name="max_tokens", datatype="INT32", shape=[1])
    req.raw_input_contents.append(struct.pack("<I", 5) + b"Hello")
    req.raw_input_contents.append(struct.pack("<iii", 1127204941, 7, 8))
    with pytest.raises(tf.TritonInputError) as ei:
        tf.parse_request(req, {"m"})
    assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_tokens" in ei.value.message and "shape [1]" in ei.value.message
    del req.raw_input_contents[1]
    req.raw_input_contents.append(struct.pack("<i", 7))
    gen, _ = tf.parse_request(req, {"m"})
    assert gen.sampling.max_tokens == 7
