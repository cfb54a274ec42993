"""The embedding worker: `python -m workers.embedding_service --port P --worker-id e0 --config C`.

Serves Worker/EmbedBatch (and Health) for one embedding model (workers/engine/embedding_loader.py):
each call is one packed forward of the batcher's texts - token ids concatenated, a length per text -
and answers the pooled vectors as float32 bytes. The forward runs on a one-thread executor, so
the event loop keeps answering health checks and forwards never overlap.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from common.service_main import Service, run_service
from protos.switchyard.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger("switchyard.embedding_worker")
SERVICE = "switchyard.v1.Worker"


class EmbeddingWorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, model_name: str, model=None):
        self.model_name = model_name
        self.model = model            # workers.engine.embedding_loader.EmbeddingModel; None while loading
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-forward")

    async def Health(self, request, context) -> worker_pb2.WorkerInfo:
        m = self.model
        return worker_pb2.WorkerInfo(model=self.model_name, ready=m is not None, device="cpu",
                                     max_model_len=m.info.max_tokens if m is not None else 0)

    async def EmbedBatch(self, request: worker_pb2.EmbedBatchRequest, context) -> worker_pb2.EmbedBatchReply:
        m = self.model
        if m is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the embedding model is still loading; retry")
        problem = check_batch(request, m.info.max_tokens, m.info.vocab_size)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        t0 = time.perf_counter()
        vectors = await asyncio.get_running_loop().run_in_executor(self._executor, self._forward, request)
        return worker_pb2.EmbedBatchReply(vectors=vectors.astype("<f4", copy=False).tobytes(), dim=vectors.shape[1],
                                          execute_ms=(time.perf_counter() - t0) * 1000)

    def _forward(self, request: worker_pb2.EmbedBatchRequest) -> np.ndarray:
        import torch
        flat = torch.from_numpy(np.asarray(request.token_ids, dtype=np.int64))
        return self.model.embed_packed(flat, list(request.lengths))

    def warmup(self) -> None:
        self.model.embed(self.model.tokenize(["warm up the kernels", "a second, somewhat longer text to embed"]))


def check_batch(request: worker_pb2.EmbedBatchRequest, max_tokens: int, vocab_size: int) -> str:
    """Why a batch cannot run ("" when it can): the batcher checked this already; a bad caller must get
    INVALID_ARGUMENT, not a crash in the forward."""
    lengths = np.asarray(request.lengths, dtype=np.int64)
    if len(lengths) == 0:
        return "lengths: the batch has no texts"
    if lengths.min() < 1 or lengths.max() > max_tokens:
        return f"lengths: every text must have 1..{max_tokens} tokens (got {lengths.min()}..{lengths.max()})"
    if int(lengths.sum()) != len(request.token_ids):
        return f"token_ids: {len(request.token_ids)} ids but lengths add up to {int(lengths.sum())}"
    if len(request.token_ids) and max(request.token_ids) >= vocab_size:
        return f"token_ids: ids must be < the vocabulary size {vocab_size}"
    return ""


def num_threads(cfg) -> int:
    """cfg.embedding_num_threads, else $OMP_NUM_THREADS, else half the cores (the rest: generation)."""
    env = int(os.environ.get("OMP_NUM_THREADS", "0"))
    return cfg.embedding_num_threads or env or max(1, (os.cpu_count() or 2) // 2)


async def start(svc: Service) -> None:
    from workers.engine.embedding_loader import canonical_name, load_embedding_model

    cfg, args = svc.cfg, svc.args
    name = canonical_name(cfg.embedding_model) or cfg.embedding_model
    servicer = EmbeddingWorkerServicer(name)
    ep = svc.grpc_server([SERVICE], args.port, grace_s=2.0)
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, ep.server)
    await ep.start(serving=False)   # listen first: health answers NOT_SERVING while the model loads
    loop = asyncio.get_running_loop()
    threads = num_threads(cfg)
    servicer.model = await loop.run_in_executor(servicer._executor, load_embedding_model, name, threads)
    await loop.run_in_executor(servicer._executor, servicer.warmup)
    await ep.set_serving(True)
    log.info("embedding worker %s serving %s on port %d (%d threads)", args.worker_id, name, ep.port, threads)


def main(argv: list[str] | None = None) -> None:
    run_service("embedding_worker", start, description="Switchyard embedding worker (Worker/EmbedBatch)", argv=argv,
                flags=("port", "host", "worker-id"), required=("port",))


if __name__ == "__main__":
    main()
