"""The transport floor for `bench overhead`: a no-op `Inference/Generate` server in its own process.

Each call is answered at once with one chunk carrying its only token and a finish reason: no
NATS, no batcher, no engine. Driven by the same client code and burst shape as the stack, its
TTFT is what grpc.aio alone costs on this machine, the part of the platform's overhead that no
change inside Switchyard's services can remove.

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
    async def Generate(self, request, context):
        resp = inference_pb2.GenerateResponse(request_id=request.request_id, token_ids=[0], finish_reason=2)
        resp.usage.completion_tokens = 1
        yield resp


async def serve(port: int) -> None:
    from common import proc, rpc
    srv = rpc.server()
    inference_pb2_grpc.add_InferenceServicer_to_server(NoOpInference(), srv)
    rpc.bind(srv, "127.0.0.1", port)
    await srv.start()
    await proc.stop_on_signals().wait()
    await srv.stop(grace=0.5)


@contextlib.contextmanager
def floor_server(log_dir):
    """Start the no-op server on a free port; yields its address; stops it on exit."""
    import grpc

    from common import proc
    from common.ports import free_port
    port = free_port()
    child = proc.spawn("grpc-floor", proc.python_module("bench.grpc_floor", "--port", str(port)), log_dir)
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
    asyncio.run(serve(ap.parse_args(argv).port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
