"""`switchyard.v1.Pool`: the launcher's internal control service over PoolManager (services/pool.py).

Only the router calls it (it does the admin-token check first); it listens on the stack's host.
PoolError lives here, below the pool: the pool raises it, this edge turns it into a gRPC status.
"""
from __future__ import annotations

import grpc

from protos.switchyard.v1 import inference_pb2, pool_pb2_grpc


class PoolError(Exception):
    """A pool operation refused or failed, with the gRPC status code (its name) to answer."""

    def __init__(self, code: str, message: str):   # code: a grpc.StatusCode name
        super().__init__(message)
        self.code = code
        self.message = message


class PoolServicer(pool_pb2_grpc.PoolServicer):
    def __init__(self, pool):
        self.pool = pool   # a services.pool.PoolManager

    async def _run(self, context, coro):
        try:
            return await coro
        except PoolError as e:
            await context.abort(getattr(grpc.StatusCode, e.code, grpc.StatusCode.INTERNAL), e.message)

    async def LoadModel(self, request: inference_pb2.LoadModelRequest, context):
        if not request.name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name: set the catalogue model to load")
        e, evicted, message = await self._run(context, self.pool.load(
            request.name, request.version, request.source, request.replicas, request.wait))
        resp = inference_pb2.LoadModelResponse(message=message, evicted=evicted)
        self.pool.model_info(e, resp.model)
        return resp

    async def UnloadModel(self, request: inference_pb2.UnloadModelRequest, context):
        if not request.name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name: set the model to unload")
        e, message = await self._run(context, self.pool.unload(request.name, request.wait))
        resp = inference_pb2.UnloadModelResponse(message=message)
        self.pool.model_info(e, resp.model)
        return resp

    async def ListModels(self, request, context):
        resp = inference_pb2.ListModelsResponse()
        for name in sorted(self.pool.models):
            self.pool.model_info(self.pool.models[name], resp.models.add())
        return resp
