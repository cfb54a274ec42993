"""Small clients over the generated stubs: a streaming Generate (`switchyard generate`, the demo) and the
admin calls of `switchyard admin ...` (services/pool_cli.py, services/adapter_cli.py)."""
from __future__ import annotations

import json
import os
import sys

import grpc

from common.rpc import sync_channel
from protos.switchyard.v1 import common_pb2, inference_pb2, inference_pb2_grpc


def stream_generate(router: str, prompt: str, *, model: str | None = None, max_tokens: int = 64,
                    temperature: float = 0.0, seed: int | None = None, chat: bool = False,
                    timeout: float = 300.0, verbose: bool = False, out=None, intent: str = "") -> int:
    """Stream one completion to `out` (default: sys.stdout at call time) as it arrives; returns a process exit code."""
    out = sys.stdout if out is None else out
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature)
    if seed is not None:
        sampling.seed = seed
    # No model: let the router choose (the default model; with a model pool, by intent - "auto" names
    # no capability, so the pool's intent rules read the prompt).
    req = inference_pb2.GenerateRequest(model=model or "", sampling=sampling,
                                        intent="" if model else (intent or "auto"))
    if chat:
        req.messages.add(role="user", content=prompt)
    else:
        req.prompt = prompt
    with sync_channel(router) as ch:   # TLS when configure_client_tls found the router's CA
        stub = inference_pb2_grpc.InferenceStub(ch)
        last = None
        try:
            call = stub.Generate(req, timeout=timeout)
            for resp in call:
                if verbose and last is None:
                    md = dict(call.initial_metadata() or ())
                    if md.get("x-switchyard-model"):
                        print(f"[model {md['x-switchyard-model']}@{md.get('x-switchyard-model-version', '')}: "
                              f"{md.get('x-switchyard-route-reason', '')}]", file=sys.stderr)
                out.write(resp.text)
                out.flush()
                last = resp
        except grpc.RpcError as e:
            print(f"\nswitchyard generate: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    # End the text's line and flush it before the usage line goes to stderr: with both streams on one
    # terminal or pipe, an unflushed newline would let the usage line land glued to the text.
    out.write("\n")
    out.flush()
    if last is not None and last.HasField("usage") and verbose:
        print(usage_line(last), file=sys.stderr, flush=True)
    return 0


def usage_line(last: inference_pb2.GenerateResponse) -> str:
    """`switchyard generate -v`'s summary of the last chunk: finish reason, token counts, timings, cost."""
    u = last.usage
    return (f"[{common_pb2.FinishReason.Name(last.finish_reason)} prompt={u.prompt_tokens} "
            f"completion={u.completion_tokens} cached={u.cached_tokens} queue={u.queue_ms:.1f}ms "
            f"prefill={u.prefill_ms:.1f}ms decode={u.decode_ms:.1f}ms cost=${u.cost_usd:.6f} worker={u.worker_id}]")


def admin_call(args, call, describe) -> int:
    """Run `call(stub, inference_pb2, metadata)` on the router's Admin service with the admin token
    (--token or $SWITCHYARD_ADMIN_TOKEN); print the reply (`describe(resp)`, or JSON with --json)."""
    import grpc
    from google.protobuf.json_format import MessageToDict

    from common.rpc import sync_channel
    from protos.switchyard.v1 import inference_pb2, inference_pb2_grpc
    token = args.token or os.environ.get("SWITCHYARD_ADMIN_TOKEN", "")
    md = (("authorization", f"Bearer {token}"),) if token else ()
    with sync_channel(args.router) as ch:
        try:
            resp = call(inference_pb2_grpc.AdminStub(ch), inference_pb2, md)
        except grpc.RpcError as e:
            print(f"switchyard admin {args.admin_cmd}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True), indent=1))
    else:
        print(describe(resp))
    return 0
