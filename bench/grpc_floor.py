"""The transport floor for `bench overhead`: a no-op `Inference/Generate` server in its own process.

Each call is answered at once with one chunk carrying its only token and a finish reason: no
NATS, no batcher, no engine. Driven by the same client code and burst shape as the stack, its
TTFT is what grpc.aio alone costs on this machine, the part of the platform's overhead that no
change inside Switchyard's services can remove.

With `--refuse` each call is refused at once instead (RESOURCE_EXHAUSTED with a retry-after-ms
trailer, as the router's admission gate answers): `bench chaos`'s burst measures the fastest
refusal grpc.aio allows on this machine beside the stack's.

`python -m bench.grpc_floor --port P` serves until SIGTERM.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time

from protos.switchyard.v1 import inference_pb2, inference_pb2_grpc


class NoOpInference(inference_pb2_grpc.InferenceServicer):
    def __init__(self, refuse: bool = False):
        self.refuse = refuse

    async def Generate(self, request, context):
        if self.refuse:
            import grpc
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "refused (the transport floor)",
                                trailing_metadata=(("retry-after-ms", "1000"),))
        resp = inference_pb2.GenerateResponse(request_id=request.request_id, token_ids=[0], finish_reason=2)
        resp.usage.completion_tokens = 1
        yield resp


async def serve(port: int, refuse: bool = False) -> None:
    from common import proc, rpc
    srv = rpc.server()
    inference_pb2_grpc.add_InferenceServicer_to_server(NoOpInference(refuse), srv)
    rpc.bind(srv, "127.0.0.1", port)
    await srv.start()
    await proc.stop_on_signals().wait()
    await srv.stop(grace=0.5)


@contextlib.contextmanager
def floor_server(log_dir, refuse: bool = False):
    """Start the no-op server on a free port; yields its address; stops it on exit."""
    import grpc

    from common import proc
    from common.ports import free_port
    port = free_port()
    child = proc.spawn("grpc-floor", proc.python_module("bench.grpc_floor", "--port", str(port),
                                                       *(["--refuse"] if refuse else [])), log_dir)
    addr = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        with grpc.insecure_channel(addr) as probe:
            while True:
                try:
                    grpc.channel_ready_future(probe).result(timeout=0.5)
                    break
                except grpc.FutureTimeoutError:
                    if not child.alive() or time.monotonic() > deadline:
                        raise RuntimeError(f"the gRPC floor server did not start:\n{child.tail()}")
        yield addr
    finally:
        child.stop(5.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--refuse", action="store_true", help="refuse every call (RESOURCE_EXHAUSTED) at once")
    args = ap.parse_args(argv)
    asyncio.run(serve(args.port, args.refuse))
    return 0


if __name__ == "__main__":
    sys.exit(main())
