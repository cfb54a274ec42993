"""The bulk-job runner inside the router: pulls items from the JetStream work queue with bounded
concurrency and runs each through the router's own public `Inference/Generate` / `Embed` (a loopback gRPC
call, so validation, routing, priorities, tenants, tracing, metrics and cost apply unchanged) in the
`batch` service class, which fills idle capacity and yields to interactive requests.

Per item: a result already stored (a redelivery after a crash between store and ack) -> ack. Job
cancelled -> a "cancelled" result. Otherwise wait until the model has a routable worker (the item is
kept alive with in-progress acks meanwhile, so a restarting worker does not use up its attempts),
run it, store the result, then ack. A retryable failure (UNAVAILABLE, RESOURCE_EXHAUSTED, a deadline,
INTERNAL) is nak'ed with backoff; after `batch_max_deliver` attempts, or at once for the caller's
mistakes (INVALID_ARGUMENT, NOT_FOUND, ...), the item's result is an error record saying why
(`x_switchyard.state = "dead_letter"` for given-up retries).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from common import rpc, subjects
from protos.switchyard.v1 import batch_pb2_grpc, inference_pb2_grpc
from router import openai_body
from router.batch_jobs import BatchService, JobStore, result_key

log = logging.getLogger("switchyard.batch")

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED}
HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.OUT_OF_RANGE: 400,
               grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
               grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
               grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNIMPLEMENTED: 501,
               grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504}
ROUTABLE_WAIT_S = 5.0     # per look: how long to wait for a worker before re-checking stop and in-progress
MAX_NAK_DELAY_S = 30.0


class BatchRunner:
    def __init__(self, router, store: JobStore, channel: grpc.aio.Channel, metrics=None):
        if metrics is None:   # not served: a private registry
            from prometheus_client import CollectorRegistry

            from telemetry.metrics import BatchMetrics
            metrics = BatchMetrics(CollectorRegistry())
        self.metrics = metrics
        self.router = router
        self.cfg = router.cfg
        self.store = store
        self.stub = inference_pb2_grpc.InferenceStub(channel)
        self._stop = asyncio.Event()
        self._fetching = True
        self._tasks: set[asyncio.Task] = set()
        self._calling = 0   # items inside Generate/Embed now (their streams count in the router's in_flight)
        self._slot_free = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._last_error: dict[tuple[str, str], str] = {}   # (job, custom_id) -> the last failure (dead letters)

    async def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="batch-runner")

    async def drain(self, grace: float) -> None:
        """Stop taking items; let the running ones finish (their results stored and acked) up to grace."""
        self._fetching = False
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)

    async def stop(self) -> None:
        self._stop.set()
        self._fetching = False
        for t in [self._loop_task, *self._tasks]:
            if t is not None:
                t.cancel()
        for t in [self._loop_task, *self._tasks]:
            if t is not None:
                with contextlib.suppress(BaseException):
                    await t

    # ---- pulling ---------------------------------------------------------------------------------
    async def _loop(self) -> None:
        import nats.errors
        sub = None
        while not self._stop.is_set() and self._fetching:
            free = self.limit() - len(self._tasks)
            if free <= 0:
                self._slot_free.clear()
                # a slot frees when an item ends; re-check the limit often while interactive load comes and goes
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._slot_free.wait(), 0.1)
                continue
            try:
                if sub is None:
                    await self.store.setup()   # idempotent; also re-creates what a wiped store lost
                    sub = await self.store.js.pull_subscribe_bind(durable=subjects.BATCH_RUNNER_CONSUMER,
                                                                  stream=subjects.BATCH_ITEMS_STREAM)
                msgs = await sub.fetch(free, timeout=1.0)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                continue
            except asyncio.CancelledError:
                raise
            except Exception as e:   # noqa: BLE001 - nats-server away or restarting: try again shortly
                log.warning("batch runner: pulling items failed (%r); retrying", e)
                sub = None
                await asyncio.sleep(1.0)
                continue
            for m in msgs:
                t = asyncio.create_task(self._run_one(m))
                self._tasks.add(t)
                self.metrics.in_flight.set(len(self._tasks))
                t.add_done_callback(self._done)

    def limit(self) -> int:
        """Items in flight allowed now: fewer while interactive streams are open (the batcher's service
        classes order the queue; this also keeps batch prefills out of the steps interactive requests share)."""
        under_load = self.cfg.batch_concurrency_under_load
        interactive = self.router.in_flight - self._calling   # the router's open streams that are not ours
        if under_load > 0 and interactive > 0:
            return min(under_load, self.cfg.batch_concurrency)
        return self.cfg.batch_concurrency

    def _done(self, t: asyncio.Task) -> None:
        self._tasks.discard(t)
        self.metrics.in_flight.set(len(self._tasks))
        self._slot_free.set()
        if not t.cancelled() and t.exception() is not None:
            log.error("batch item failed unexpectedly", exc_info=t.exception())

    # ---- one item --------------------------------------------------------------------------------
    async def _run_one(self, msg) -> None:
        import json
        item = json.loads(msg.data)
        job_id, cid = item["job"], item["custom_id"]
        key = result_key(cid)
        attempt = msg.metadata.num_delivered
        keepalive = asyncio.create_task(self._keep_alive(msg))
        try:
            rec = await self._with_nats(lambda: self.store.job(job_id))
            if await self._with_nats(lambda: self.store.has_result(job_id, key)):
                await self._ack(msg)
                return
            if rec is None or rec["status"] in ("cancelling", "cancelled", "failed"):
                await self._store(job_id, key, msg, _error_record(item, "cancelled", "batch_cancelled",
                                                                  "the job was cancelled before this item ran",
                                                                  None, attempt))
                return
            if attempt > self.cfg.batch_max_deliver:   # the runner died during earlier attempts
                last = self._last_error.pop((job_id, cid), "the router stopped during the last attempt")
                await self._store(job_id, key, msg, _error_record(
                    item, "dead_letter", "max_deliver_exceeded",
                    f"gave up after {attempt - 1} attempts (batch_max_deliver = {self.cfg.batch_max_deliver}); "
                    f"last error: {last}", None, attempt - 1))
                return
            try:
                req, _ = openai_body.parse(item["url"], item["body"], item.get("model") or self.cfg.model)
            except openai_body.BodyError as e:   # checked at submit; a config change could still refuse it
                await self._store(job_id, key, msg, _error_record(item, "failed", "invalid_request", e.message,
                                                                  400, attempt))
                return
            req.service_class = "batch"
            if not await self._wait_routable(req.model):
                return   # stopping: the item is redelivered later
            self._calling += 1
            try:
                body, usage = await self._call(item["url"], req, rec.get("authorization", ""))
            except grpc.aio.AioRpcError as e:
                self._calling -= 1
                await self._failed(item, key, msg, e, attempt)
                return
            except BaseException:
                self._calling -= 1
                raise
            self._calling -= 1
            await self._store(job_id, key, msg, _ok_record(item, body, usage, attempt))
            self._last_error.pop((job_id, cid), None)
        finally:
            keepalive.cancel()

    async def _call(self, url: str, req, authorization: str) -> tuple[dict, dict]:
        md = (("authorization", authorization),) if authorization else None
        timeout = self.cfg.batch_item_timeout_s
        if url == openai_body.EMBEDDINGS:
            resp = await self.stub.Embed(req, metadata=md, timeout=timeout)
            body = openai_body.embeddings_response(resp, req.model)
            return body, {"prompt_tokens": resp.prompt_tokens}
        text, finish, usage, rid = [], 0, None, req.request_id
        async for r in self.stub.Generate(req, metadata=md, timeout=timeout):
            rid = rid or r.request_id
            text.append(r.text)
            if r.finish_reason:
                finish, usage = r.finish_reason, r.usage
        if usage is None:
            raise_incomplete()
        body = openai_body.full_response(url, rid, req.model, "".join(text), finish, usage)
        return body, {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                      "cost_usd": usage.cost_usd, "request_id": rid}

    async def _failed(self, item: dict, key: str, msg, e: grpc.aio.AioRpcError, attempt: int) -> None:
        code = e.code()
        why = rpc.describe(e)
        if code in RETRYABLE and attempt < self.cfg.batch_max_deliver and not self._stop.is_set():
            self._last_error[(item["job"], item["custom_id"])] = why
            delay = min(MAX_NAK_DELAY_S, 0.5 * 2 ** (attempt - 1))
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                for k, v in e.trailing_metadata() or ():
                    if k == "retry-after-ms":
                        delay = max(delay, int(v) / 1000.0)
            log.info("batch item %s/%s attempt %d failed (%s); again in %.1fs", item["job"], item["custom_id"],
                     attempt, why, delay)
            self.metrics.retries.labels(code.name).inc()
            with contextlib.suppress(Exception):
                await msg.nak(delay=delay)
            return
        if code in RETRYABLE:
            state, err_code = "dead_letter", "max_deliver_exceeded"
            message = f"gave up after {attempt} attempts (batch_max_deliver = {self.cfg.batch_max_deliver}); " \
                      f"last error: {why}"
        else:
            state, err_code, message = "failed", code.name.lower(), why
        self._last_error.pop((item["job"], item["custom_id"]), None)
        await self._store(item["job"], key, msg, _error_record(item, state, err_code, message,
                                                               HTTP_STATUS.get(code, 500), attempt))

    async def _store(self, job_id: str, key: str, msg, rec: dict) -> None:
        """Store the result, then ack: never the other way round (a crash between the two redelivers the
        item, which then finds its result and is only acked)."""
        await self._with_nats(lambda: self.store.store_result(job_id, key, rec))
        await self._ack(msg)
        self.metrics.items.labels(rec["x_switchyard"]["state"]).inc()
        job = await self._with_nats(lambda: self.store.job(job_id))
        if job is not None:
            async with self.store.lock(job_id):
                await self._with_nats(lambda: self.store.finalize(job))

    async def _ack(self, msg) -> None:
        try:
            await msg.ack()
        except Exception as e:   # noqa: BLE001 - nats away: the item comes back and finds its result stored
            log.info("batch: ack failed (%r); the item will be redelivered and only acked", e)

    async def _with_nats(self, call):
        """Retry a JetStream call until it works (nats-server restarting) or the runner stops."""
        delay = 0.2
        while True:
            try:
                return await call()
            except asyncio.CancelledError:
                raise
            except Exception as e:   # noqa: BLE001 - only NATS trouble reaches here; logged
                if self._stop.is_set():
                    raise
                log.warning("batch: JetStream call failed (%r); retrying in %.1fs", e, delay)
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)

    async def _keep_alive(self, msg) -> None:
        """In-progress acks while an item waits or runs, so JetStream does not hand it to anyone else."""
        every = max(0.5, self.cfg.batch_ack_wait_s / 3)
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _wait_routable(self, model: str) -> bool:
        """Until some worker can take the model's requests (without a pool); False when stopping."""
        r = self.router
        if r.pool_routing is not None or model not in r.known_models():
            return True   # the pool loads models on demand; unknown names fail in Generate with the reason
        while not self._stop.is_set():
            if r.table.routable(model):
                return True
            await r.table.changed.wait_for(lambda: bool(r.table.routable(model)), ROUTABLE_WAIT_S)
        return False


def raise_incomplete():
    raise _Incomplete()


class _Incomplete(grpc.aio.AioRpcError):
    def __init__(self):
        super().__init__(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                         "the stream ended without a final response")


def _base(item: dict, attempt: int, state: str) -> dict:
    return {"id": "batch_req_" + result_key(item["job"] + "/" + item["custom_id"])[:24],
            "custom_id": item["custom_id"], "x_switchyard": {"state": state, "attempts": attempt,
                                                             "line": item.get("line", 0)}}


def _ok_record(item: dict, body: dict, usage: dict, attempt: int) -> dict:
    rec = _base(item, attempt, "completed")
    rec["response"] = {"status_code": 200, "request_id": usage.pop("request_id", ""), "body": body}
    rec["error"] = None
    rec["x_switchyard"].update(usage)
    return rec


def _error_record(item: dict, state: str, code: str, message: str, status: int | None, attempt: int) -> dict:
    rec = _base(item, attempt, state)
    err = {"code": code, "message": message}
    rec["response"] = None if status is None else {"status_code": status, "request_id": "",
                                                   "body": {"error": {**err, "type": "invalid_request_error"
                                                                      if status < 500 else "server_error",
                                                                      "param": None}}}
    rec["error"] = err
    return rec


class BatchJobs:
    """What router/main.py wires up: the Batch servicer on the router's server and the runner beside it."""

    def __init__(self, svc, router, ep, authorize=None):
        self.store = JobStore(router.nc, router.cfg)
        host = "127.0.0.1" if svc.host in ("0.0.0.0", "", "::", "[::]") else svc.host
        # The runner calls this router's own public API: everything a client request gets, items get.
        from telemetry.metrics import BatchMetrics
        self.runner = BatchRunner(router, self.store, svc.channel(f"{host}:{ep.port}"), BatchMetrics())
        self.service = BatchService(self.store, router, self.runner)
        rpc.add_checked_servicer(batch_pb2_grpc.add_BatchServicer_to_server, self.service, ep.server,
                                 router.cfg.batch_max_file_bytes + (1 << 20), authorize=authorize)
        svc.on_stop(self.runner.stop)

    async def start(self) -> None:
        try:
            await self.store.setup()
            await self._fail_interrupted()
        except Exception as e:   # noqa: BLE001 - NATS without JetStream, or slow: the runner retries
            log.warning("bulk jobs: JetStream set-up failed (%r); retrying in the background", e)
        await self.runner.start()

    async def _fail_interrupted(self) -> None:
        """A job still "validating" was being queued when a router died: some of its items may be missing,
        so it fails (saying so); items of it that were queued end as "cancelled" results."""
        import time
        for rec in await self.store.list_jobs():
            if rec["status"] == "validating":
                await self.store.put_job(dict(rec, status="failed", finished_at=time.time(),
                                              message="the router restarted while this job was being queued; "
                                                      "submit it again"))

    async def drain(self, grace: float) -> None:
        await self.runner.drain(grace)
