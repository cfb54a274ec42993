"""Every NATS subject Switchyard uses, built in one place (DESIGN.md, "Names").

Subjects are lower case with the prefix `sy.`. Ids that go into a subject must be a single NATS
token: no dots, spaces or wildcards; `check_token` enforces it so a request id can never
address someone else's subject.
"""
from __future__ import annotations

import re

PREFIX = "sy"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_token(value: str, what: str = "id") -> str:
    """Return value if it is usable as one subject token, else raise ValueError naming `what`."""
    if not isinstance(value, str) or not _TOKEN.match(value):
        raise ValueError(f"{what} must match [A-Za-z0-9_-]{{1,64}}, got {value!r}")
    return value


def request(worker_id: str) -> str:
    """Router -> the batcher that owns worker_id: new requests (BatchRequest)."""
    return f"{PREFIX}.req.{check_token(worker_id, 'worker id')}"


def tokens(request_id: str) -> str:
    """Batcher -> router: the request's token chunks (TokenChunk), one per engine step."""
    return f"{PREFIX}.tok.{check_token(request_id, 'request id')}"


def cancel(request_id: str) -> str:
    """Router -> batcher: stop this request and free its blocks (Cancel)."""
    return f"{PREFIX}.cancel.{check_token(request_id, 'request id')}"


def kv_events(worker_id: str) -> str:
    """Batcher -> KV index: the KV events of one step (KvEventBatch)."""
    return f"{PREFIX}.kv.{check_token(worker_id, 'worker id')}"


def heartbeat(worker_id: str) -> str:
    """Batcher -> router and KV index: liveness and load (Heartbeat)."""
    return f"{PREFIX}.hb.{check_token(worker_id, 'worker id')}"


def control(worker_id: str) -> str:
    """Anyone -> the batcher of worker_id: load/unload its model (ModelControl, request-reply)."""
    return f"{PREFIX}.ctl.{check_token(worker_id, 'worker id')}"


# Wildcards for the subscribers that listen to every worker / request.
ALL_CANCELS = f"{PREFIX}.cancel.*"
ALL_KV_EVENTS = f"{PREFIX}.kv.*"
ALL_HEARTBEATS = f"{PREFIX}.hb.*"


def last_token(subject: str) -> str:
    """The id at the end of a subject (e.g. the worker id of sy.hb.<worker_id>)."""
    return subject.rsplit(".", 1)[-1]


# Durable bulk jobs (router/batch_jobs.py): JetStream streams and buckets, file storage.
BATCH_ITEMS_STREAM = "SY_BATCH_ITEMS"       # work queue: one message per item, removed when acknowledged
BATCH_RESULTS_STREAM = "SY_BATCH_RESULTS"   # one message per subject (job + custom_id): duplicates collapse
BATCH_JOBS_BUCKET = "sy_batch_jobs"         # KV: job id -> the job's record (JSON)
BATCH_RUNNER_CONSUMER = "sy-batch-runner"   # the router's durable pull consumer on BATCH_ITEMS_STREAM
ALL_BATCH_ITEMS = f"{PREFIX}.batch.item.*"
ALL_BATCH_RESULTS = f"{PREFIX}.batch.result.>"


def batch_item(job_id: str) -> str:
    """Router -> its batch runner (through the work-queue stream): one item of a job."""
    return f"{PREFIX}.batch.item.{check_token(job_id, 'job id')}"


def batch_result(job_id: str, key: str) -> str:
    """The stored result of one item; `key` is a token derived from its custom_id."""
    return f"{PREFIX}.batch.result.{check_token(job_id, 'job id')}.{check_token(key, 'result key')}"


def batch_results(job_id: str) -> str:
    """Every stored result of a job (a filter)."""
    return f"{PREFIX}.batch.result.{check_token(job_id, 'job id')}.*"

# Tenant quotas shared by router replicas (router/quotas.py): JetStream KV, memory storage.
QUOTAS_BUCKET = "sy_quotas"                 # rate.<tenant>: token bucket; slots.<tenant>: streams per router
