"""The embedding batcher: `python -m batcher.embedding_batcher --worker-id e0 --worker-addr HOST:PORT`.

One per embedding worker (workers/embedding_service.py). It speaks the batcher protocol through
`NatsEdge` (sy.req / sy.cancel / sy.ctl / sy.hb, like the pass-through batcher), as its host:

* admit: an embed BatchRequest (`embed`, token ids concatenated in prompt_token_ids, a length per
  text in embed_lengths) joins the queue - interactive before batch service class, FIFO within. A
  generation request is refused with INVALID_ARGUMENT: an embedding model cannot generate.
* the loop packs texts from the queued requests, oldest first, into one Worker/EmbedBatch call of at
  most `embedding_batch_tokens` tokens (a large request spreads over several forwards; small ones
  share one), and answers each request with ONE TokenChunk when its last text is back: its vectors
  as float32 bytes (`embed_vectors`, `embed_dim`), finish_reason STOP and usage.prompt_tokens.
* heartbeats carry model_kind "embedding" and max_model_len = the model's token limit per text, so
  the router routes Inference/Embed here and ListModels shows the model.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import grpc
import numpy as np

from batcher.nats_edge import NatsEdge
from common import rpc
from common.service_main import Service, run_service
from protos.switchyard.v1 import bus_pb2, common_pb2, worker_pb2, worker_pb2_grpc
from workers.engine.embedding_loader import EMBEDDING_KIND, canonical_name
from workers.engine.errors import InvalidRequestError, QueueFullError

log = logging.getLogger("switchyard.embedding_batcher")

QUEUE_FORWARDS = 64             # queued tokens are bounded at this many full forwards; then RESOURCE_EXHAUSTED
RETRY_AFTER_MS = 200
READY_POLL_S = 0.2


@dataclass
class EmbedJob:
    """One admitted Embed request: its texts are sent in order, in one or more forwards."""
    request_id: str
    reply: str
    ids: np.ndarray                 # uint32, every text's tokens concatenated
    cum: np.ndarray                 # int64 prefix sums of the lengths: text i is ids[cum[i]:cum[i+1]]
    deadline_ms: int
    admitted: float = field(default_factory=time.perf_counter)
    next: int = 0                   # first text not sent to the worker yet
    done: int = 0                   # texts whose vectors are back
    vectors: np.ndarray | None = None
    cancelled: bool = False
    first_sent: float = 0.0

    @property
    def n(self) -> int:
        return len(self.cum) - 1

    @property
    def tokens(self) -> int:
        return int(self.cum[-1])


def take_texts(queues: list[deque], budget: int) -> list[tuple[EmbedJob, int, int]]:
    """The next forward: (job, first text, end text) runs in queue order, at most `budget` tokens (but
    always at least one text). Fully sent jobs leave their queue; a partly sent one stays at the head."""
    parts: list[tuple[EmbedJob, int, int]] = []
    left = budget
    for q in queues:
        while q and left > 0:
            job = q[0]
            i = job.next
            j = int(np.searchsorted(job.cum, job.cum[i] + left, side="right")) - 1
            if j <= i:
                if parts:
                    return parts
                j = i + 1           # one text over the budget still runs (alone)
            parts.append((job, i, j))
            left -= int(job.cum[j] - job.cum[i])
            job.next = j
            if j < job.n:
                return parts        # budget spent inside this job
            q.popleft()
    return parts


class EmbeddingBatcher:
    """NatsEdge host for one embedding worker."""

    def __init__(self, cfg, worker_id: str, worker_addr: str, nc, metrics=None):
        self.cfg = cfg
        self.worker_id = worker_id
        self.worker_addr = worker_addr
        self.model = canonical_name(cfg.embedding_model) or cfg.embedding_model
        self.healthy = False
        self.max_tokens = 0             # per text, from the worker's Health
        self.batch_tokens = max(1, cfg.embedding_batch_tokens)
        self._channel = rpc.channel(worker_addr, cfg.max_message_bytes)
        self._stub = worker_pb2_grpc.WorkerStub(self._channel)
        self.edge = NatsEdge(nc, worker_id, self, heartbeat_interval_s=cfg.heartbeat_interval_s)
        self._queues: list[deque] = [deque(), deque()]   # interactive, batch
        self._jobs: dict[str, EmbedJob] = {}
        self._queued_tokens = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.prompt_tokens_total = 0
        self.forwards = 0
        self.metrics = metrics          # telemetry.metrics.EmbeddingMetrics, or None

    # ---- start / stop ----------------------------------------------------------------------------
    async def start(self, ready_timeout: float = 300.0) -> None:
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                info = await self._stub.Health(worker_pb2.HealthRequest(), timeout=2.0, wait_for_ready=True)
                if info.ready:
                    self.max_tokens = info.max_model_len
                    break
            except grpc.aio.AioRpcError as e:
                log.debug("embedding worker %s not up yet: %s", self.worker_id, e.code())
            if time.monotonic() > deadline:
                raise TimeoutError(f"embedding worker {self.worker_id} at {self.worker_addr} not ready after "
                                   f"{ready_timeout:.0f}s")
            await asyncio.sleep(READY_POLL_S)
        self.healthy = True
        self._task = asyncio.create_task(self._loop(), name="embedding-batcher-loop")
        await self.edge.start()

    async def drain(self, grace: float) -> None:
        await self.edge.drain(grace)

    async def stop(self) -> None:
        await self.edge.stop()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._channel.close()

    # ---- EdgeHost ----------------------------------------------------------------------------------
    def unavailable_reason(self) -> str:
        return "waiting for its embedding worker"

    def admit(self, req: bus_pb2.BatchRequest, reply: str) -> None:
        if not req.embed:
            raise InvalidRequestError("model", f"{self.model!r} is an embedding model: it cannot generate text; "
                                               "call Inference/Embed (POST /v1/embeddings) with it instead")
        lengths = np.asarray(req.embed_lengths, dtype=np.int64)
        if len(lengths) == 0:
            raise InvalidRequestError("texts", "give at least one text")
        if len(lengths) > self.cfg.embedding_max_texts:
            raise InvalidRequestError("texts", f"{len(lengths)} texts; at most embedding_max_texts = "
                                               f"{self.cfg.embedding_max_texts} per request")
        if lengths.min() < 1 or lengths.max() > self.max_tokens:
            raise InvalidRequestError("texts", f"every text must have 1..{self.max_tokens} tokens")
        cum = np.concatenate(([0], np.cumsum(lengths)))
        if int(cum[-1]) != len(req.prompt_token_ids):
            raise InvalidRequestError("texts", "embed_lengths do not add up to the token ids sent")
        if self._queued_tokens and self._queued_tokens + int(cum[-1]) > QUEUE_FORWARDS * self.batch_tokens:
            raise QueueFullError(f"embedding worker {self.worker_id} has {self._queued_tokens} tokens queued; "
                                 "retry", RETRY_AFTER_MS)
        job = EmbedJob(req.request_id, reply, np.asarray(req.prompt_token_ids, dtype=np.uint32), cum,
                       req.deadline_unix_ms)
        self._jobs[job.request_id] = job
        self._queued_tokens += job.tokens
        self._queues[1 if req.service_class == "batch" else 0].append(job)
        self._wake.set()

    def cancel(self, request_id: str) -> asyncio.Future:
        job = self._jobs.pop(request_id, None)
        if job is not None:
            job.cancelled = True
            self._unqueue(job)
        self.edge.end(request_id)
        done = asyncio.get_running_loop().create_future()
        done.set_result(True)
        return done

    async def control(self, ctl: bus_pb2.ModelControl) -> bus_pb2.ModelControlReply:
        return bus_pb2.ModelControlReply(ok=False, code="FAILED_PRECONDITION",
                                         error=f"embedding worker {self.worker_id} takes no {ctl.action!r}: its "
                                               "model is fixed (embedding_model)")

    def fill_heartbeat(self, hb: bus_pb2.Heartbeat) -> None:
        hb.model_kind = EMBEDDING_KIND
        hb.max_model_len = self.max_tokens
        hb.num_waiting = sum(len(q) for q in self._queues)
        hb.num_running = len(self._jobs) - hb.num_waiting
        hb.prompt_tokens_total = self.prompt_tokens_total

    async def before_heartbeat(self) -> None:
        return None

    # ---- the forward loop --------------------------------------------------------------------------
    def _unqueue(self, job: EmbedJob) -> None:
        for q in self._queues:
            if job in q:
                q.remove(job)
        self._queued_tokens -= int(job.cum[-1] - job.cum[job.next])

    async def _loop(self) -> None:
        while True:
            if not any(self._queues):
                self._wake.clear()
                await self._wake.wait()
            await self._expire()
            parts = take_texts(self._queues, self.batch_tokens)
            if not parts:
                continue
            try:
                await self._forward(parts)
            except Exception:   # a bug here must not leave the requests hanging: fail them, keep serving
                log.exception("embedding batcher %s: forward failed", self.worker_id)
                for job, _, _ in parts:
                    if self._jobs.pop(job.request_id, None) is not None:
                        self._unqueue(job)
                        await self.edge.fail(job.request_id, bus_pb2.CHUNK_ERROR_INTERNAL,
                                             "embedding batcher error (see its log)")

    async def _expire(self) -> None:
        now_ms = time.time() * 1000
        for q in self._queues:
            for job in [j for j in q if j.deadline_ms and j.deadline_ms <= now_ms]:
                self._jobs.pop(job.request_id, None)
                self._unqueue(job)
                await self.edge.fail(job.request_id, bus_pb2.CHUNK_ERROR_UNAVAILABLE, "deadline passed in the queue",
                                     reason="deadline")

    async def _forward(self, parts: list[tuple[EmbedJob, int, int]]) -> None:
        ids = np.concatenate([job.ids[job.cum[i]:job.cum[j]] for job, i, j in parts])
        lengths = np.concatenate([np.diff(job.cum[i:j + 1]) for job, i, j in parts])
        self._queued_tokens -= len(ids)
        now = time.perf_counter()
        for job, i, _ in parts:
            if i == 0:
                job.first_sent = now
                if self.metrics is not None:
                    self.metrics.queue_time.observe(now - job.admitted)
        try:
            out = await self._stub.EmbedBatch(worker_pb2.EmbedBatchRequest(token_ids=ids.tolist(),
                                                                           lengths=lengths.tolist()))
        except grpc.aio.AioRpcError as e:
            log.warning("embedding worker %s: EmbedBatch failed: %s", self.worker_id, rpc.describe(e))
            for job in {id(j): j for j, _, _ in parts}.values():
                if self._jobs.pop(job.request_id, None) is not None:
                    self._unqueue(job)
                    await self.edge.fail(job.request_id, bus_pb2.CHUNK_ERROR_UNAVAILABLE,
                                         f"embedding worker {self.worker_id} failed ({rpc.describe(e)}); retry",
                                         reason="worker_lost")
            return
        self.forwards += 1
        if self.metrics is not None:
            m = self.metrics
            m.forward.observe(time.perf_counter() - now)
            m.forward_texts.observe(len(lengths))
            m.texts.inc(len(lengths))
            m.tokens.inc(len(ids))
            m.queued_tokens.set(self._queued_tokens)
        vectors = np.frombuffer(out.vectors, dtype="<f4").reshape(len(lengths), out.dim)
        row = 0
        for job, i, j in parts:
            k = j - i
            if not job.cancelled:
                if job.vectors is None:
                    job.vectors = np.empty((job.n, out.dim), dtype="<f4")
                job.vectors[i:j] = vectors[row:row + k]
                job.done += k
                if job.done == job.n:
                    await self._answer(job, out.dim)
            row += k

    async def _answer(self, job: EmbedJob, dim: int) -> None:
        self._jobs.pop(job.request_id, None)
        reply = self.edge.end(job.request_id)
        if reply is None:
            return
        self.prompt_tokens_total += job.tokens
        if self.metrics is not None:
            self.metrics.requests.inc()
        usage = common_pb2.Usage(prompt_tokens=job.tokens, worker_id=self.worker_id,
                                 queue_ms=(job.first_sent - job.admitted) * 1000)
        chunk = bus_pb2.TokenChunk(request_id=job.request_id, embed_vectors=job.vectors.tobytes(), embed_dim=dim,
                                   finish_reason=common_pb2.FINISH_REASON_STOP, usage=usage)
        await self.edge.nc.publish(reply, chunk.SerializeToString())


async def start(svc: Service) -> None:
    from telemetry import metrics

    cfg, wid = svc.cfg, svc.args.worker_id
    nc = await svc.connect_nats(f"embedding-batcher-{wid}")
    model = canonical_name(cfg.embedding_model) or cfg.embedding_model
    batcher = EmbeddingBatcher(cfg, wid, svc.args.worker_addr, nc, metrics=metrics.EmbeddingMetrics(model, wid))
    svc.on_stop(batcher.stop)
    svc.on_drain(batcher.drain)
    await batcher.start(ready_timeout=cfg.startup_timeout_s)


def main(argv: list[str] | None = None) -> None:
    run_service("embedding_batcher", start, description="Switchyard embedding batcher (packs texts for one "
                "embedding worker)", argv=argv, flags=("worker-id", "worker-addr", "nats"),
                required=("worker-id", "worker-addr"))


if __name__ == "__main__":
    main()
