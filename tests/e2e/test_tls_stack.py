"""A whole stack with TLS on every hop (`tls = true`, as `switchyard up --tls`): development certificates
made in the work directory, mutual TLS inside, NATS with TLS and users, and a front door that requires
client certificates. A completion streams end to end (through the router, and through the Triton front
door and its own mTLS hop to the router); plaintext and certificate-less clients do not get in; the
local CLI finds the CA and its client certificate in stack.json."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import grpc
import pytest

from common import tls
from tests.e2e.conftest import REPO, collect, gen_request, start_stack


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory):
    from common.ports import free_port
    h = start_stack(tmp_path_factory.mktemp("tls_stack"), workers=1, tls=True, tls_client_auth="required",
                    triton_port=free_port("127.0.0.1"))
    yield h
    leftovers = h.stop()
    assert not leftovers, f"processes outlived the stack stop: {leftovers}"


async def generate(target: str, creds: grpc.ChannelCredentials | None):
    from common.rpc import options
    from protos.switchyard.v1 import inference_pb2_grpc
    ch = grpc.aio.secure_channel(target, creds, options=options()) if creds is not None \
        else grpc.aio.insecure_channel(target, options=options())
    async with ch:
        return await collect(inference_pb2_grpc.InferenceStub(ch), gen_request("The capital of France is",
                                                                                max_tokens=6), timeout=120)


def test_tls_stack_streams_a_completion_end_to_end_and_refuses_plaintext(tls_stack):
    state = tls_stack.state["tls"]
    assert state["client_auth"] == "required" and state["client_cert"]
    nats_conf = (tls_stack.workdir / "nats.conf").read_text()
    assert "verify: true" in nats_conf and "authorization" in nats_conf

    cli = tls.client_settings(state["ca"], state["client_cert"], state["client_key"])
    text, ids, resps = asyncio.run(generate(tls_stack.router, tls.channel_credentials(cli)))
    assert len(ids) == 6 and text.strip() and resps[-1].HasField("usage")

    for creds in (None, tls.channel_credentials(tls.client_settings(state["ca"]))):   # plaintext; no client cert
        with pytest.raises(grpc.RpcError) as e:
            asyncio.run(generate(tls_stack.router, creds))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE

    # `switchyard generate` with no TLS flags: the CA and the CLI's certificate come from stack.json
    out = subprocess.run([sys.executable, "-m", "services.cli", "generate", "The capital of France is",
                          "--max-tokens", "6", "--router", tls_stack.router], cwd=REPO, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == text.strip()

    # The Triton front door: mTLS from the client, and mTLS again on its hop to the router.
    from workers.backends.tritongrpc import load
    _tg, _aio, pb, pb_grpc, _mc, _tu = load()
    req = pb.ModelInferRequest(model_name="smollm2-135m", id="tls-1")
    req.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"Hello")
    req.inputs.add(name="max_tokens", datatype="INT32", shape=[1]).contents.int_contents.append(2)

    async def infer(creds):
        ch = grpc.aio.secure_channel(tls_stack.state["triton"], creds) if creds is not None \
            else grpc.aio.insecure_channel(tls_stack.state["triton"])
        async with ch:
            return await pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=120)
    assert asyncio.run(infer(tls.channel_credentials(cli))).outputs
    with pytest.raises(grpc.RpcError) as e:
        asyncio.run(infer(None))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert json.loads((tls_stack.workdir / "stack.json").read_text())["tls"]["ca"] == state["ca"]
    from services.client_tls import configure_client_tls
    assert configure_client_tls(tls_stack.router)   # in this process too, as the CLI does (stack.json)
    try:
        assert tls_stack.worker_status()["healthy"]   # `switchyard status`'s call, over mTLS
    finally:
        tls.configure(None)
