"""The router: the only public endpoint (switchyard.v1.Inference and Admin over grpc.aio).

Per Generate: validate -> tokenize -> block hashes -> KvIndex/Match (only when there is a
choice) -> pick a worker -> subscribe sy.tok.<id> -> publish sy.req.<worker> -> relay chunks.
A client cancel or deadline cancels this handler; the `finally` publishes sy.cancel.<id> so the
batcher frees the request's blocks. A worker dropped from the heartbeat table fails its streams
with UNAVAILABLE.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc

from kv_manager.block_hash import block_hashes
from protos.switchyard.v1 import (bus_pb2, inference_pb2, inference_pb2_grpc, kv_index_pb2,
                                  kv_index_pb2_grpc)
from router import routing
from router.validation import RequestError, check_input, check_prompt_length, invalid, validate_generate
from services import subjects
from services.config import StackConfig
from workers.step_codec import sampling_to_proto

log = logging.getLogger("switchyard.router")

_ERROR_CODES = {
    bus_pb2.CHUNK_ERROR_QUEUE_FULL: grpc.StatusCode.RESOURCE_EXHAUSTED,
    bus_pb2.CHUNK_ERROR_INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    bus_pb2.CHUNK_ERROR_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    bus_pb2.CHUNK_ERROR_INTERNAL: grpc.StatusCode.INTERNAL,
}
MATCH_TIMEOUT_S = 0.25   # KV locality is a hint: route on load alone rather than wait longer


class _WorkerGone:
    """Put into a stream's queue when its worker leaves the table."""

    def __init__(self, message: str):
        self.message = message


class Router(inference_pb2_grpc.InferenceServicer, inference_pb2_grpc.AdminServicer):
    def __init__(self, cfg: StackConfig, nc, kv_channel: grpc.aio.Channel | None, tokenizer_loader=None):
        self.cfg = cfg
        self.nc = nc
        self.kv = kv_index_pb2_grpc.KvIndexStub(kv_channel) if kv_channel is not None else None
        self.table = routing.WorkerTable(cfg.worker_timeout_s)
        self.draining = False
        self._load_tokenizer = tokenizer_loader
        self._tokenizers: dict = {}
        self._streams: dict[str, tuple[str, asyncio.Queue]] = {}   # request id -> (worker id, queue)
        self._tasks: list[asyncio.Task] = []
        self._subs = []

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        await self.tokenizer(self.cfg.model)  # load before SERVING: the first request must not pay it
        self._subs.append(await self.nc.subscribe(subjects.ALL_HEARTBEATS, cb=self._on_heartbeat))
        self._tasks.append(asyncio.create_task(self._expire_loop(), name="router-expire"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for s in self._subs:
            try:
                await s.unsubscribe()
            except Exception:
                pass

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    async def drain(self, grace: float) -> None:
        """Refuse new requests; wait (up to grace) for the open streams to finish."""
        self.draining = True
        deadline = time.monotonic() + grace
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def tokenizer(self, model: str):
        tok = self._tokenizers.get(model)
        if tok is None:
            loader = self._load_tokenizer
            if loader is None:
                from services.tokenizers import load_tokenizer as loader
            tok = await asyncio.get_running_loop().run_in_executor(None, loader, model)
            self._tokenizers[model] = tok
        return tok

    def known_models(self) -> list[str]:
        return sorted({self.cfg.model, *(w.model for w in self.table.workers.values() if w.model)})

    # ---- heartbeats ----------------------------------------------------------------------------
    async def _on_heartbeat(self, msg) -> None:
        hb = bus_pb2.Heartbeat.FromString(msg.data)
        prev = self.table.workers.get(hb.worker_id)
        self.table.observe(hb)
        if prev is not None:
            return
        # A worker (re)joining: keep the router's own in-flight count for it.
        self.table.workers[hb.worker_id].in_flight = sum(1 for w, _ in self._streams.values() if w == hb.worker_id)

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            for wid in self.table.expire():
                log.warning("worker %s silent for %.1fs: dropped", wid, self.cfg.worker_timeout_s)
                self._fail_worker_streams(wid, f"worker {wid} stopped responding (no heartbeat for "
                                               f"{self.cfg.worker_timeout_s:.0f}s); retry")

    def _fail_worker_streams(self, worker_id: str, message: str) -> None:
        for w, q in self._streams.values():
            if w == worker_id:
                q.put_nowait(_WorkerGone(message))

    # ---- routing -------------------------------------------------------------------------------
    async def _pick_worker(self, model: str, token_ids: list[int]) -> str:
        views = self.table.routable(model)
        if not views:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"no healthy worker serves model {model!r} right now; retry")
        if len(views) == 1:
            return views[0].worker_id  # no choice to make: skip the KV index round trip
        block_size = views[0].heartbeat.block_size or self.cfg.block_size
        matched: dict[str, int] = {}
        hashes = block_hashes(token_ids, block_size)
        if hashes and self.kv is not None:
            try:
                resp = await self.kv.Match(kv_index_pb2.MatchRequest(model=model, block_hashes=hashes),
                                           timeout=MATCH_TIMEOUT_S)
                matched = {m.worker_id: m.matched_blocks for m in resp.workers}
            except grpc.aio.AioRpcError as e:
                log.debug("KvIndex/Match failed (%s): routing on load only", e.code())
        cands = self.table.candidates(model, matched)
        return routing.choose(cands, len(hashes), self.cfg.overlap_weight, self.cfg.load_weight).worker_id

    def _max_model_len(self, model: str) -> int:
        lens = [w.heartbeat.max_model_len for w in self.table.routable(model) if w.heartbeat.max_model_len]
        return min(lens) if lens else (self.cfg.max_model_len or 1 << 30)

    async def _encode(self, model: str, prompt: str, messages: list[dict]) -> list[int]:
        tok = await self.tokenizer(model)
        text = tok.apply_chat_template(messages) if messages else prompt
        return list(tok.encode(text))

    # ---- Inference -----------------------------------------------------------------------------
    async def Generate(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the router is shutting down; retry on another replica")
        try:
            v = validate_generate(request, self.known_models(), self.cfg.model)
            if v.request_id in self._streams:
                raise invalid("request_id", f"{v.request_id!r} is already in flight")
            token_ids = await self._encode(v.model, v.prompt, v.messages)
            if not token_ids:
                raise invalid("prompt", "tokenizes to zero tokens")
            check_prompt_length(len(token_ids), self._max_model_len(v.model))
            worker_id = await self._pick_worker(v.model, token_ids)
        except RequestError as e:
            await context.abort(e.code, e.message)
            return

        rid = v.request_id
        reply = subjects.tokens(rid)
        queue: asyncio.Queue = asyncio.Queue()

        async def on_chunk(msg) -> None:
            queue.put_nowait(msg.data)

        # Subscribe BEFORE publishing: the first chunk can never race past us.
        sub = await self.nc.subscribe(reply, cb=on_chunk)
        self._streams[rid] = (worker_id, queue)
        view = self.table.workers.get(worker_id)
        if view is not None:
            view.in_flight += 1
        finished = False
        first = True
        try:
            breq = bus_pb2.BatchRequest(request_id=rid, prompt_token_ids=token_ids, priority=v.priority,
                                        reply_subject=reply)
            sampling_to_proto(v.sampling, breq.sampling)
            remaining = context.time_remaining()
            if remaining is not None:
                breq.deadline_unix_ms = int((time.time() + remaining) * 1000)
            traceparent = _metadata(context, "traceparent")
            if traceparent:
                breq.traceparent = traceparent
            await self.nc.publish(subjects.request(worker_id), breq.SerializeToString(),
                                  headers={"traceparent": traceparent} if traceparent else None)
            while True:
                item = await queue.get()
                if isinstance(item, _WorkerGone):
                    finished = True  # nothing left to cancel
                    await context.abort(grpc.StatusCode.UNAVAILABLE, item.message)
                chunk = bus_pb2.TokenChunk.FromString(item)
                if chunk.error:
                    finished = True  # rejected or failed: the batcher holds nothing
                    code = _ERROR_CODES.get(chunk.error, grpc.StatusCode.INTERNAL)
                    trailers = (("retry-after-ms", str(chunk.retry_after_ms or 100)),) \
                        if code == grpc.StatusCode.RESOURCE_EXHAUSTED else ()
                    await context.abort(code, chunk.error_message, trailing_metadata=trailers)
                resp = inference_pb2.GenerateResponse(request_id=rid, text=chunk.text, token_ids=chunk.token_ids,
                                                      logprobs=chunk.logprobs)
                if first:
                    resp.worker_id = worker_id
                    first = False
                if chunk.finish_reason:
                    finished = True
                    resp.finish_reason = chunk.finish_reason
                    resp.usage.CopyFrom(chunk.usage)
                    yield resp
                    return
                yield resp
        finally:
            # Runs on normal end, abort, client cancel and deadline (the handler task is cancelled).
            if view is not None:
                view.in_flight = max(0, view.in_flight - 1)
            self._streams.pop(rid, None)
            if not finished:
                try:
                    await self.nc.publish(subjects.cancel(rid), bus_pb2.Cancel(request_id=rid).SerializeToString())
                except Exception:
                    log.warning("could not publish cancel for %s", rid, exc_info=True)
            try:
                await sub.unsubscribe()
            except Exception:
                pass

    async def ListModels(self, request, context) -> inference_pb2.ListModelsResponse:
        by_model = self.table.models()
        resp = inference_pb2.ListModelsResponse()
        for name in self.known_models():
            ws = by_model.get(name, [])
            resp.models.add(name=name, num_workers=len(ws),
                            max_model_len=min((w.heartbeat.max_model_len for w in ws), default=0))
        return resp

    async def Tokenize(self, request: inference_pb2.TokenizeRequest, context) -> inference_pb2.TokenizeResponse:
        try:
            from router.validation import resolve_model
            model = resolve_model(request.model, "", self.known_models(), self.cfg.model)
            messages = check_input(request.prompt, request.messages)
            ids = await self._encode(model, request.prompt, messages)
        except RequestError as e:
            await context.abort(e.code, e.message)
            return
        return inference_pb2.TokenizeResponse(token_ids=ids, count=len(ids))

    # ---- Admin ---------------------------------------------------------------------------------
    async def Status(self, request, context) -> kv_index_pb2.StatusResponse:
        """The workers as this router sees them, plus the KV index's block counts (best effort)."""
        from kv_manager.service import status_from_heartbeat
        indexed: dict[str, int] = {}
        total = 0
        if self.kv is not None:
            try:
                kv_status = await self.kv.Status(kv_index_pb2.StatusRequest(), timeout=1.0)
                indexed = {w.worker_id: w.indexed_blocks for w in kv_status.workers}
                total = kv_status.indexed_blocks_total
            except grpc.aio.AioRpcError:
                pass
        now = time.monotonic()
        resp = kv_index_pb2.StatusResponse(indexed_blocks_total=total)
        for wid in sorted(self.table.workers):
            w = self.table.workers[wid]
            ws = status_from_heartbeat(w.heartbeat, now - w.last_seen, indexed.get(wid, 0))
            ws.router_in_flight = w.in_flight
            resp.workers.append(ws)
        return resp


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str:
    for k, val in context.invocation_metadata() or ():
        if k == key:
            return val if isinstance(val, str) else val.decode()
    return ""


def new_request_id() -> str:
    return uuid.uuid4().hex
