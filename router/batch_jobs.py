"""Durable bulk jobs: the `switchyard.v1.Batch` servicer and the JetStream store behind it.

Where things live (all JetStream file storage, so a job survives any process, nats-server included):
* job records: KV bucket `sy_batch_jobs` (job id -> JSON: status, total, input errors, ...);
* items: the work-queue stream `SY_BATCH_ITEMS`, one message per item on `sy.batch.item.<job>`, published
  with a Nats-Msg-Id (job + index) so a re-sent item is dropped by the server; the router's runner
  (router/batch_runner.py) acknowledges an item only after its result is stored;
* results: the stream `SY_BATCH_RESULTS`, one subject per item (`sy.batch.result.<job>.<key of custom_id>`)
  with at most one message per subject, so a result stored twice (an item redelivered after its result was
  stored but before the ack) still counts once: every custom_id is in the results exactly once.

Progress (counts by state, tokens, cost, rate, ETA) is folded from the results: read once per job from
the stream (after a restart), then kept up to date as this router stores each result.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

import grpc

from common import subjects
from protos.switchyard.v1 import batch_pb2, batch_pb2_grpc
from router import openai_body
from router.openai_body import BodyError

log = logging.getLogger("switchyard.batch")

ITEM_FIELDS = {"custom_id", "method", "url", "body"}
MAX_REPORTED_ERRORS = 200          # input errors kept in the job record (the count is exact)
MAX_CUSTOM_ID_CHARS = 512
RESULTS_PER_CHUNK = 256            # GetResults: lines per streamed message
PUBLISH_CONCURRENCY = 128          # item publishes awaited together at job creation
TERMINAL = ("completed", "cancelled", "failed")
STATES = ("completed", "failed", "cancelled", "dead_letter")


def result_key(custom_id: str) -> str:
    """A subject token for a custom_id (which may hold any characters)."""
    return hashlib.sha256(custom_id.encode()).hexdigest()[:40]


@dataclass
class Progress:
    """A job's results folded: which items have one, counts by state, tokens, cost."""
    keys: set = field(default_factory=set)
    counts: dict = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    first_at: float = 0.0
    last_at: float = 0.0

    def add(self, key: str, rec: dict) -> bool:
        """Count a stored result once; False if this item was counted already."""
        if key in self.keys:
            return False
        self.keys.add(key)
        x = rec.get("x_switchyard") or {}
        state = x.get("state", "failed")
        self.counts[state] = self.counts.get(state, 0) + 1
        self.prompt_tokens += int(x.get("prompt_tokens", 0))
        self.completion_tokens += int(x.get("completion_tokens", 0))
        self.cost_usd += float(x.get("cost_usd", 0.0))
        at = float(x.get("stored_at", time.time()))
        self.first_at = at if not self.first_at else min(self.first_at, at)
        self.last_at = max(self.last_at, at)
        return True

    @property
    def done(self) -> int:
        return len(self.keys)


class JobError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class JobStore:
    """Job records, items and results in JetStream (see the module doc)."""

    def __init__(self, nc, cfg):
        self.nc = nc
        self.js = nc.jetstream()
        self.cfg = cfg
        self.kv = None
        self._progress: dict[str, Progress] = {}
        self._jobs: dict[str, tuple[float, dict]] = {}   # job id -> (read at, record): the runner's cache
        self._locks: dict[str, asyncio.Lock] = {}

    async def setup(self) -> None:
        """Create (or find) the streams, the bucket and the runner's consumer; idempotent."""
        from nats.js import api
        from nats.js.errors import BadRequestError
        streams = [
            api.StreamConfig(name=subjects.BATCH_ITEMS_STREAM, subjects=[subjects.ALL_BATCH_ITEMS],
                             retention=api.RetentionPolicy.WORK_QUEUE, storage=api.StorageType.FILE,
                             duplicate_window=600.0),
            api.StreamConfig(name=subjects.BATCH_RESULTS_STREAM, subjects=[subjects.ALL_BATCH_RESULTS],
                             retention=api.RetentionPolicy.LIMITS, storage=api.StorageType.FILE,
                             max_msgs_per_subject=1, discard=api.DiscardPolicy.OLD),
        ]
        for sc in streams:
            try:
                await self.js.add_stream(sc)
            except BadRequestError:   # exists with another config (an older version): keep it
                await self.js.stream_info(sc.name)
        self.kv = await self.js.create_key_value(bucket=subjects.BATCH_JOBS_BUCKET, storage=api.StorageType.FILE,
                                                 history=1)
        # max_deliver is enforced by the runner, not the server: the server would stop delivering an item
        # whose last attempt died with the router, leaving it with no result at all.
        cc = api.ConsumerConfig(durable_name=subjects.BATCH_RUNNER_CONSUMER, ack_policy=api.AckPolicy.EXPLICIT,
                                ack_wait=float(self.cfg.batch_ack_wait_s), max_deliver=-1,
                                max_ack_pending=max(1000, 4 * self.cfg.batch_concurrency))
        try:
            await self.js.add_consumer(subjects.BATCH_ITEMS_STREAM, cc)
        except BadRequestError:
            await self.js.consumer_info(subjects.BATCH_ITEMS_STREAM, subjects.BATCH_RUNNER_CONSUMER)

    # ---- job records -----------------------------------------------------------------------------
    async def put_job(self, rec: dict) -> None:
        await self.kv.put(rec["id"], json.dumps(rec).encode())
        self._jobs[rec["id"]] = (time.monotonic(), rec)

    async def get_job(self, job_id: str) -> dict | None:
        from nats.js.errors import KeyNotFoundError
        try:
            subjects.check_token(job_id, "job id")
        except ValueError:
            return None
        try:
            e = await self.kv.get(job_id)
        except KeyNotFoundError:
            return None
        if e.value is None:
            return None
        rec = json.loads(e.value)
        self._jobs[job_id] = (time.monotonic(), rec)
        return rec

    async def job(self, job_id: str, max_age_s: float = 1.0) -> dict | None:
        """The record, from a cache at most max_age_s old (the runner asks for every item)."""
        hit = self._jobs.get(job_id)
        if hit is not None and time.monotonic() - hit[0] < max_age_s:
            return hit[1]
        return await self.get_job(job_id)

    async def list_jobs(self) -> list[dict]:
        recs = await asyncio.gather(*(self.get_job(k) for k in await self._job_ids()))
        return [r for r in recs if r]

    async def _job_ids(self) -> list[str]:
        """The bucket's keys. nats-py's kv.keys() leaves its watcher's consumer on the server until
        it times out (minutes): a few hundred listings hit the stream's consumer limit (found by
        the 10,000-message fuzz run). The same watch, with its consumer deleted at once."""
        watcher = await self.kv.watchall(ignore_deletes=True, meta_only=True, inactive_threshold=30.0)
        keys: list[str] = []
        try:
            info = await watcher._sub.consumer_info()
            async for entry in watcher:
                if not entry:            # the end of the current values
                    break
                keys.append(entry.key)
        finally:
            await watcher.stop()
            try:
                await self.js.delete_consumer(info.stream_name, info.name)
            except Exception:   # noqa: BLE001 - already gone, or NATS away: it times out on its own
                pass
        return keys

    def lock(self, job_id: str) -> asyncio.Lock:
        return self._locks.setdefault(job_id, asyncio.Lock())

    # ---- items -----------------------------------------------------------------------------------
    async def publish_items(self, job_id: str, items: list[dict]) -> None:
        subject = subjects.batch_item(job_id)
        sem = asyncio.Semaphore(PUBLISH_CONCURRENCY)

        async def one(i: int, item: dict) -> None:
            async with sem:
                await self.js.publish(subject, json.dumps(item).encode(), headers={"Nats-Msg-Id": f"{job_id}-{i}"})
        await asyncio.gather(*(one(i, it) for i, it in enumerate(items)))

    # ---- results ---------------------------------------------------------------------------------
    async def has_result(self, job_id: str, key: str) -> bool:
        p = self._progress.get(job_id)
        if p is not None and key in p.keys:
            return True
        from nats.js.errors import NotFoundError
        try:
            await self.js.get_last_msg(subjects.BATCH_RESULTS_STREAM, subjects.batch_result(job_id, key))
            return True
        except NotFoundError:
            return False

    async def store_result(self, job_id: str, key: str, rec: dict) -> None:
        """Store (PubAck awaited: it is on disk before the item is acknowledged), then count it."""
        rec.setdefault("x_switchyard", {})["stored_at"] = time.time()
        await self.js.publish(subjects.batch_result(job_id, key), json.dumps(rec).encode())
        p = self._progress.get(job_id)
        if p is not None:
            p.add(key, rec)

    async def read_results(self, job_id: str):
        """Every stored result of a job, as (key, record) (an ephemeral consumer over its subjects)."""
        from nats.errors import TimeoutError as NatsTimeout
        from nats.js import api
        cfg = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL, ack_policy=api.AckPolicy.NONE,
                                 inactive_threshold=30.0)
        sub = await self.js.pull_subscribe(subjects.batch_results(job_id), stream=subjects.BATCH_RESULTS_STREAM,
                                           config=cfg)
        try:
            pending = (await sub.consumer_info()).num_pending
            while pending > 0:
                try:
                    msgs = await sub.fetch(min(pending, 512), timeout=5.0)
                except NatsTimeout:
                    break
                for m in msgs:
                    pending = m.metadata.num_pending
                    yield subjects.last_token(m.subject), json.loads(m.data)
        finally:
            try:
                await sub.unsubscribe()
            except Exception as e:   # noqa: BLE001 - best effort: the consumer also expires by itself
                log.debug("results consumer unsubscribe: %r", e)

    async def progress(self, job_id: str) -> Progress:
        p = self._progress.get(job_id)
        if p is None:
            async with self.lock(job_id):
                p = self._progress.get(job_id)
                if p is None:
                    p = Progress()
                    async for key, rec in self.read_results(job_id):
                        p.add(key, rec)
                    self._progress[job_id] = p
        return p

    async def finalize(self, rec: dict) -> dict:
        """Mark a job completed / cancelled once every item has a result (idempotent)."""
        if rec["status"] in TERMINAL or rec["status"] == "validating":
            return rec
        p = await self.progress(rec["id"])
        if p.done >= rec["total"]:
            rec = dict(rec, status="cancelled" if rec["status"] == "cancelling" else "completed",
                       finished_at=time.time())
            await self.put_job(rec)
        return rec


# ---- input parsing -----------------------------------------------------------------------------------
def parse_lines(data: bytes, endpoint: str, default_model: str, known_models, max_items: int
                ) -> tuple[list[dict], list[dict]]:
    """JSONL -> (items, errors per line). A bad line is an error naming its line; the others still run."""
    items, errors = [], []
    seen: set[str] = set()
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            errors.append(dict(line=n, code="invalid_encoding", message=f"line {n} is not valid UTF-8 ({e.reason} "
                               f"at byte {e.start})", param="", custom_id=""))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            errors.append(dict(line=n, code="invalid_json", message=f"line {n} is not valid JSON: {e.msg} "
                               f"(column {e.colno})", param="", custom_id=""))
            continue
        err = check_item(obj, endpoint, default_model, known_models, seen)
        if err is not None:
            code, message, param = err
            cid = obj.get("custom_id", "") if isinstance(obj, dict) else ""
            errors.append(dict(line=n, code=code, message=f"line {n}: {message}", param=param,
                               custom_id=cid if isinstance(cid, str) else ""))
            continue
        seen.add(obj["custom_id"])
        items.append(dict(line=n, custom_id=obj["custom_id"], url=obj.get("url") or endpoint, body=obj["body"]))
        if len(items) > max_items:
            raise JobError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"more than batch_max_items = {max_items} items in one job; split the file")
    return items, errors


def check_item(obj, endpoint: str, default_model: str, known_models, seen: set) -> tuple[str, str, str] | None:
    """(code, message, param) of what is wrong with one input line, or None."""
    if not isinstance(obj, dict):
        return "invalid_request", "must be a JSON object with custom_id, method, url and body", ""
    extra = sorted(set(obj) - ITEM_FIELDS)
    if extra:
        return "invalid_request", f"unrecognized field(s) {extra}; a line has custom_id, method, url, body", extra[0]
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid or len(cid) > MAX_CUSTOM_ID_CHARS:
        return "invalid_request", f"custom_id must be a non-empty string of at most {MAX_CUSTOM_ID_CHARS} " \
                                  "characters", "custom_id"
    if cid in seen:
        return "duplicate_custom_id", f"custom_id {cid!r} appears more than once in this job", "custom_id"
    method = obj.get("method", "POST")
    if method != "POST":
        return "invalid_request", f"method must be POST, got {method!r}", "method"
    url = obj.get("url") or endpoint
    if url != endpoint:
        return "invalid_request", f"url {url!r} differs from the job's endpoint {endpoint!r}", "url"
    body = obj.get("body")
    if not isinstance(body, dict):
        return "invalid_request", "body must be a JSON object (the request body of the url)", "body"
    try:
        req, stream = openai_body.parse(url, body, default_model)
    except BodyError as e:
        return "invalid_request", e.message, f"body.{e.param}" if e.param else "body"
    if stream:
        return "invalid_request", "stream must be false in a bulk job", "body.stream"
    if known_models is not None and req.model not in known_models:
        return "model_not_found", f"model {req.model!r} is not served here; known: {sorted(known_models)}", \
            "body.model"
    return None


def job_message(rec: dict, p: Progress | None) -> batch_pb2.BatchJob:
    j = batch_pb2.BatchJob(id=rec["id"], status=rec["status"], endpoint=rec["endpoint"], model=rec.get("model", ""),
                           created_at=rec["created_at"], started_at=rec.get("started_at", 0.0),
                           finished_at=rec.get("finished_at", 0.0), cancelled_at=rec.get("cancelled_at", 0.0),
                           input_file_id=rec.get("input_file_id", ""), message=rec.get("message", ""),
                           metadata=rec.get("metadata") or {}, eta_s=-1.0)
    c = j.counts
    c.total = rec["total"]
    c.invalid_lines = rec.get("invalid_lines", 0)
    for e in rec.get("input_errors", []):
        j.input_errors.add(**e)
    if p is not None:
        c.completed = p.counts["completed"]
        c.dead_letter = p.counts["dead_letter"]
        c.failed = p.counts["failed"] + p.counts["dead_letter"]
        c.cancelled = p.counts["cancelled"]
        c.pending = max(0, rec["total"] - p.done)
        j.prompt_tokens, j.completion_tokens, j.cost_usd = p.prompt_tokens, p.completion_tokens, p.cost_usd
        start = rec.get("started_at") or rec["created_at"]
        span = (p.last_at - start) if p.done else 0.0
        if span > 0:
            j.items_per_s = p.done / span
            j.eta_s = c.pending / j.items_per_s
        if not c.pending:
            j.eta_s = 0.0
    return j


def _metadata(context, key: str) -> str:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v
    return ""


class BatchService(batch_pb2_grpc.BatchServicer):
    """switchyard.v1.Batch on the router."""

    def __init__(self, store: JobStore, router, runner=None):
        self.store = store
        self.router = router
        self.runner = runner

    def _known_models(self):
        if self.router.pool_routing is not None:
            return None   # the pool resolves names (and loads models) at run time
        return set(self.router.known_models()) | set(self.router.known_adapters())

    async def _ready(self, context) -> None:
        if self.store.kv is None:
            try:
                await self.store.setup()
            except Exception as e:   # noqa: BLE001 - reported to the caller
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"JetStream is not available ({e!r}); retry")

    async def CreateJob(self, request: batch_pb2.BatchCreateJobRequest, context) -> batch_pb2.BatchJob:
        await self._ready(context)
        cfg = self.router.cfg
        endpoint = request.endpoint or openai_body.CHAT
        if endpoint not in openai_body.ENDPOINTS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"endpoint {endpoint!r} is not supported; use one "
                                f"of {', '.join(openai_body.ENDPOINTS)}")
        if len(request.jsonl) > cfg.batch_max_file_bytes:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the input is {len(request.jsonl)} bytes, over "
                                f"batch_max_file_bytes = {cfg.batch_max_file_bytes}; split it into several jobs")
        data = bytes(request.jsonl)
        if request.items:   # inline items: the same checks as file lines
            data = b"\n".join(json.dumps({"custom_id": it.custom_id, "url": it.url or endpoint,
                                          "body": _loads(it.body_json)}).encode() for it in request.items)
        try:
            items, errors = parse_lines(data, endpoint, request.model or cfg.model, self._known_models(),
                                        cfg.batch_max_items)
        except JobError as e:
            await context.abort(e.code, e.message)
        job_id = "batch_" + uuid.uuid4().hex[:24]
        now = time.time()
        rec = dict(id=job_id, status="validating", endpoint=endpoint, model=request.model, total=len(items),
                   created_at=now, invalid_lines=len(errors), input_errors=errors[:MAX_REPORTED_ERRORS],
                   metadata=dict(request.metadata), input_file_id=request.input_file_id,
                   authorization=_metadata(context, "authorization"))
        if not items:
            rec.update(status="failed", finished_at=now, message="no valid line in the input: see input_errors")
            await self.store.put_job(rec)
            return job_message(rec, None)
        default_model = request.model or cfg.model
        for it in items:
            it["job"] = job_id
            it["model"] = default_model
        await self.store.put_job(rec)
        try:
            await self.store.publish_items(job_id, items)
        except Exception as e:
            rec.update(status="failed", finished_at=time.time(), message=f"queueing the items failed: {e!r}")
            await self.store.put_job(rec)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"could not queue the job's items ({e!r}); retry")
        rec.update(status="in_progress", started_at=time.time())
        await self.store.put_job(rec)
        self.store._progress.setdefault(job_id, Progress())   # nothing stored yet: no need to read the stream
        log.info("job %s: %d items queued, %d invalid lines", job_id, len(items), len(errors))
        return job_message(rec, await self.store.progress(job_id))

    async def _record(self, job_id: str, context) -> dict:
        await self._ready(context)
        rec = await self.store.get_job(job_id)
        if rec is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no batch job {job_id!r}")
        return rec

    async def GetJob(self, request, context) -> batch_pb2.BatchJob:
        rec = await self.store.finalize(await self._record(request.job_id, context))
        return job_message(rec, await self.store.progress(rec["id"]) if rec["status"] != "validating" else None)

    async def ListJobs(self, request, context) -> batch_pb2.BatchListJobsResponse:
        await self._ready(context)
        import nats.errors
        try:
            recs = sorted(await self.store.list_jobs(), key=lambda r: r["created_at"], reverse=True)
        except nats.errors.Error as e:   # JetStream refused or is away: a retryable condition, not UNKNOWN
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"could not list jobs ({e!r}); retry")
        if request.after:
            idx = next((i for i, r in enumerate(recs) if r["id"] == request.after), None)
            recs = recs[idx + 1:] if idx is not None else []
        limit = request.limit or 100
        resp = batch_pb2.BatchListJobsResponse(has_more=len(recs) > limit)
        for r in recs[:limit]:
            resp.jobs.append(job_message(r, await self.store.progress(r["id"]) if r["status"] != "validating"
                                         else None))
        return resp

    async def CancelJob(self, request, context) -> batch_pb2.BatchJob:
        rec = await self._record(request.job_id, context)
        if rec["status"] in ("in_progress", "validating"):
            rec = dict(rec, status="cancelling", cancelled_at=time.time())
            await self.store.put_job(rec)
        rec = await self.store.finalize(rec)
        return job_message(rec, await self.store.progress(rec["id"]))

    async def GetResults(self, request, context):
        await self._record(request.job_id, context)
        which = request.which or "all"
        if which not in ("all", "output", "errors"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "which must be all, output or errors")
        lines: list[str] = []
        async for _key, rec in self.store.read_results(request.job_id):
            ok = rec.get("error") is None
            if which == "all" or (which == "output") == ok:
                lines.append(json.dumps(rec))
            if len(lines) >= RESULTS_PER_CHUNK:
                yield batch_pb2.BatchResultsChunk(lines=lines)
                lines = []
        if lines:
            yield batch_pb2.BatchResultsChunk(lines=lines)


def _loads(text: str):
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return text   # reported by check_item as "body must be a JSON object"

