"""OpenAI-compatible HTTP front door: `python -m services.openai_http --port P [--router HOST:PORT]`
(`switchyard up --http-port P` starts and supervises it).

A FastAPI app on uvicorn, and a gRPC client of the router: every request becomes a router call
(`Inference/Generate`, `Embed`, `ListModels`, `switchyard.v1.Batch/*`), so routing, priorities, tenants,
tracing, metrics and cost apply unchanged. Bodies are checked and translated by router/openai_body.py
(the same code the bulk-job runner uses for batch lines). `Authorization: Bearer ...` and `traceparent`
are forwarded as gRPC metadata. Errors are OpenAI's JSON shape `{"error": {message, type, param, code}}`
with the HTTP status of the gRPC code (GRPC_TO_HTTP); 429 carries `retry-after` (and `retry-after-ms`).

Endpoints: GET /v1/models, POST /v1/completions, /v1/chat/completions (`stream`: server-sent events,
`stream_options.include_usage`), /v1/embeddings, /v1/files (multipart upload; GET list / one / content,
DELETE), /v1/batches (create / get / list / cancel: the Batch API over the router's durable bulk jobs).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time

import grpc
from fastapi import Request  # at module level: FastAPI resolves the handlers' annotations here

from common.service_main import Service, run_service
from protos.switchyard.v1 import batch_pb2, batch_pb2_grpc, inference_pb2, inference_pb2_grpc
from router import openai_body
from router.openai_body import BodyError
from services.openai_files import FileStore, job_file

log = logging.getLogger("switchyard.openai_http")

GRPC_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "server_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error"),
}
BATCH_FIELDS = {"input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"}
COMPLETION_WINDOW = "24h"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _json(status: int, body: dict, headers: dict | None = None):
    from starlette.responses import JSONResponse
    return JSONResponse(body, status_code=status, headers=headers)


def http_error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None, headers: dict | None = None):
    return _json(status, error_body(message, type_, param, code), headers)


def from_grpc(e: grpc.aio.AioRpcError):
    """An RpcError as OpenAI's error JSON with the matching HTTP status (429: retry-after)."""
    status, type_ = GRPC_TO_HTTP.get(e.code(), (500, "server_error"))
    headers = None
    if status == 429:
        ms = next((int(v) for k, v in (e.trailing_metadata() or ()) if k == "retry-after-ms"), 1000)
        headers = {"retry-after": str(max(1, math.ceil(ms / 1000))), "retry-after-ms": str(ms)}
    code = {404: "model_not_found" if "model" in (e.details() or "") else "not_found",
            401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(status, e.code().name.lower())
    return http_error(status, e.details() or e.code().name, type_, None, code, headers)


def from_body_error(e: BodyError):
    return http_error(400, e.message, "invalid_request_error", e.param, e.code)


def batch_object(j: batch_pb2.BatchJob) -> dict:
    """A switchyard BatchJob as OpenAI's Batch object (plus `x_switchyard`: tokens, cost, rate, ETA)."""
    c = j.counts
    terminal = j.status in ("completed", "cancelled", "failed")
    ts = lambda x: int(x) if x else None   # noqa: E731
    errors = None
    if j.input_errors or c.invalid_lines:
        errors = {"object": "list", "data": [{"code": e.code, "message": e.message, "param": e.param or None,
                                              "line": e.line} for e in j.input_errors]}
    failed = c.failed + c.cancelled + c.invalid_lines
    return {
        "id": j.id, "object": "batch", "endpoint": j.endpoint, "errors": errors,
        "input_file_id": j.input_file_id or None, "completion_window": COMPLETION_WINDOW, "status": j.status,
        "output_file_id": f"file-output-{j.id}" if terminal and c.completed else None,
        "error_file_id": f"file-errors-{j.id}" if terminal and (c.failed + c.cancelled) else None,
        "created_at": int(j.created_at), "in_progress_at": ts(j.started_at),
        "expires_at": int(j.created_at) + 24 * 3600, "finalizing_at": None,
        "completed_at": ts(j.finished_at) if j.status == "completed" else None,
        "failed_at": ts(j.finished_at) if j.status == "failed" else None, "expired_at": None,
        "cancelling_at": ts(j.cancelled_at), "cancelled_at": ts(j.finished_at) if j.status == "cancelled" else None,
        "request_counts": {"total": c.total + c.invalid_lines, "completed": c.completed, "failed": failed},
        "metadata": dict(j.metadata) or None,
        "x_switchyard": {"pending": c.pending, "dead_letter": c.dead_letter, "cancelled": c.cancelled,
                         "invalid_lines": c.invalid_lines, "prompt_tokens": j.prompt_tokens,
                         "completion_tokens": j.completion_tokens, "cost_usd": j.cost_usd,
                         "items_per_s": j.items_per_s, "eta_s": j.eta_s, "message": j.message or None},
    }


def build_app(channel: grpc.aio.Channel, files: FileStore, max_file_bytes: int, default_model: str = ""):
    """The FastAPI app over a channel to the router."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException
    from starlette.responses import Response, StreamingResponse

    stub = inference_pb2_grpc.InferenceStub(channel)
    batches = batch_pb2_grpc.BatchStub(channel)
    app = FastAPI(title="Switchyard OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPException)
    async def _http_exc(_request, exc: HTTPException):
        return http_error(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def _validation(_request, exc):
        return http_error(400, str(exc), "invalid_request_error")

    @app.exception_handler(grpc.aio.AioRpcError)
    async def _rpc(_request, exc: grpc.aio.AioRpcError):
        return from_grpc(exc)

    def metadata(request: Request) -> tuple:
        md = []
        for h in ("authorization", "traceparent"):
            v = request.headers.get(h)
            if v:
                md.append((h, v))
        return tuple(md)

    async def json_body(request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise BodyError("the request body is not valid UTF-8") from None
        except json.JSONDecodeError as e:
            raise BodyError(f"the request body is not valid JSON: {e.msg} (line {e.lineno} column {e.colno})") \
                from None
        if not isinstance(body, dict):
            raise BodyError("the request body must be a JSON object")
        return body

    @app.get("/v1/models")
    async def models(request: Request):
        resp = await stub.ListModels(inference_pb2.ListModelsRequest(), metadata=metadata(request))
        return {"object": "list", "data": [{"id": m.name, "object": "model", "created": 0, "owned_by": "switchyard",
                                            "max_model_len": m.max_model_len, "state": m.state or None}
                                           for m in resp.models]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str, request: Request):
        resp = await stub.ListModels(inference_pb2.ListModelsRequest(), metadata=metadata(request))
        for m in resp.models:
            if m.name == model_id:
                return {"id": m.name, "object": "model", "created": 0, "owned_by": "switchyard"}
        return http_error(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")

    async def generate(endpoint: str, request: Request):
        try:
            body = await json_body(request)
            parse = openai_body.parse_chat if endpoint == openai_body.CHAT else openai_body.parse_completion
            req, stream, include_usage = parse(body, default_model)
        except BodyError as e:
            return from_body_error(e)
        created = int(time.time())
        call = stub.Generate(req, metadata=metadata(request))
        it = call.__aiter__()
        try:   # the first response (or the error) decides the HTTP status
            first = await it.__anext__()
        except grpc.aio.AioRpcError as e:
            return from_grpc(e)
        except StopAsyncIteration:
            return http_error(502, "the router ended the stream without a response", "server_error")
        rid = first.request_id
        if not stream:
            text, last = [first.text], first
            try:
                async for r in it:
                    text.append(r.text)
                    last = r
            except grpc.aio.AioRpcError as e:
                return from_grpc(e)
            return openai_body.full_response(endpoint, rid, req.model, "".join(text), last.finish_reason,
                                             last.usage, created)

        async def events():
            try:
                r, is_first = first, True
                while True:
                    if r.text or r.finish_reason or is_first:
                        chunk = openai_body.stream_chunk(endpoint, rid, req.model, created, r.text, r.finish_reason,
                                                         first=is_first)
                        yield f"data: {json.dumps(chunk)}\n\n"
                    is_first = False
                    if r.finish_reason:
                        if include_usage:
                            u = openai_body.usage_chunk(endpoint, rid, req.model, created, r.usage)
                            yield f"data: {json.dumps(u)}\n\n"
                        break
                    try:
                        r = await it.__anext__()
                    except StopAsyncIteration:
                        break
                yield "data: [DONE]\n\n"
            except grpc.aio.AioRpcError as e:   # after the first event the status is sent: an error event
                status, type_ = GRPC_TO_HTTP.get(e.code(), (500, "server_error"))
                yield f"data: {json.dumps(error_body(e.details() or e.code().name, type_, None, str(status)))}\n\n"
            finally:
                call.cancel()   # a client that went away: the router cancels the request at the batcher
        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await generate(openai_body.CHAT, request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(openai_body.COMPLETIONS, request)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        try:
            req, fmt = openai_body.parse_embeddings(await json_body(request), default_model)
        except BodyError as e:
            return from_body_error(e)
        resp = await stub.Embed(req, metadata=metadata(request))
        return openai_body.embeddings_response(resp, req.model, fmt)

    # ---- files -----------------------------------------------------------------------------------
    @app.post("/v1/files")
    async def upload(request: Request):
        declared = int(request.headers.get("content-length") or 0)
        if declared > max_file_bytes + 64 * 1024:
            return http_error(413, f"the upload is {declared} bytes; files are limited to batch_max_file_bytes = "
                                   f"{max_file_bytes}", param="file", code="file_too_large")
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as e:   # noqa: BLE001 - a malformed multipart body is the caller's mistake
            return http_error(400, f"expected a multipart/form-data body with 'file' and 'purpose': {e}")
        purpose, upload_file = form.get("purpose"), form.get("file")
        if purpose not in ("batch", "user_data"):
            return http_error(400, f"'purpose' must be 'batch' (or 'user_data'), got {purpose!r}", param="purpose")
        if upload_file is None or isinstance(upload_file, str):
            return http_error(400, "'file' is required (a file part)", param="file")
        data = await upload_file.read(max_file_bytes + 1)
        if len(data) > max_file_bytes:
            return http_error(413, f"the file is over batch_max_file_bytes = {max_file_bytes} bytes; split it",
                              param="file", code="file_too_large")
        return files.add(data, upload_file.filename or "upload.jsonl", purpose)

    @app.get("/v1/files")
    async def list_files(purpose: str | None = None):
        return {"object": "list", "data": files.list(purpose), "has_more": False}

    @app.get("/v1/files/{file_id}")
    async def get_file(file_id: str, request: Request):
        rec = files.get(file_id)
        if rec is None and job_file(file_id):
            job_id, which = job_file(file_id)
            data = await results_file(job_id, which, request)
            return {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                    "filename": f"{job_id}_{which}.jsonl", "purpose": "batch_output", "status": "processed"}
        return rec or http_error(404, f"No such File object: {file_id}", param="id", code="not_found")

    async def results_file(job_id: str, which: str, request: Request) -> bytes:
        lines = []
        async for chunk in batches.GetResults(batch_pb2.BatchGetResultsRequest(job_id=job_id, which=which),
                                              metadata=metadata(request)):
            lines.extend(chunk.lines)
        return "".join(line + "\n" for line in lines).encode()

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str, request: Request):
        jf = job_file(file_id)
        if jf is not None:
            return Response(await results_file(*jf, request), media_type="application/jsonl")
        data = files.content(file_id)
        if data is None:
            return http_error(404, f"No such File object: {file_id}", param="id", code="not_found")
        return Response(data, media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str):
        if not files.delete(file_id):
            return http_error(404, f"No such File object: {file_id}", param="id", code="not_found")
        return {"id": file_id, "object": "file", "deleted": True}

    # ---- batches ---------------------------------------------------------------------------------
    @app.post("/v1/batches")
    async def create_batch(request: Request):
        try:
            body = await json_body(request)
            for k in body:
                if k not in BATCH_FIELDS:
                    raise BodyError(f"Unrecognized request argument supplied: {k}", param=k)
            endpoint = body.get("endpoint")
            if endpoint not in openai_body.ENDPOINTS:
                raise BodyError(f"'endpoint' must be one of {', '.join(openai_body.ENDPOINTS)}", param="endpoint")
            if body.get("completion_window") != COMPLETION_WINDOW:
                raise BodyError("'completion_window' must be '24h'", param="completion_window")
            meta = body.get("metadata") or {}
            if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
                raise BodyError("'metadata' must map strings to strings", param="metadata")
        except BodyError as e:
            return from_body_error(e)
        file_id = body.get("input_file_id")
        data = files.content(file_id) if isinstance(file_id, str) else None
        if data is None:
            return http_error(404, f"No such File object: {file_id}", param="input_file_id", code="not_found")
        job = await batches.CreateJob(batch_pb2.BatchCreateJobRequest(jsonl=data, endpoint=endpoint, metadata=meta,
                                                                      input_file_id=file_id),
                                      metadata=metadata(request))
        return batch_object(job)

    @app.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str, request: Request):
        return batch_object(await batches.GetJob(batch_pb2.BatchGetJobRequest(job_id=batch_id),
                                                 metadata=metadata(request)))

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str, request: Request):
        return batch_object(await batches.CancelJob(batch_pb2.BatchCancelJobRequest(job_id=batch_id),
                                                    metadata=metadata(request)))

    @app.get("/v1/batches")
    async def list_batches(request: Request, limit: int = 20, after: str | None = None):
        resp = await batches.ListJobs(batch_pb2.BatchListJobsRequest(limit=max(1, min(limit, 100)), after=after or ""),
                                      metadata=metadata(request))
        data = [batch_object(j) for j in resp.jobs]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": resp.has_more}

    return app


async def start(svc: Service) -> None:
    import uvicorn

    from common.ports import free_port
    cfg = svc.cfg
    port = svc.port(cfg.http_port if cfg.http_port is not None else 0) or free_port(svc.host)
    channel = svc.channel(svc.args.router or cfg.router_address)
    folder = cfg.http_files_dir or str(__import__("pathlib").Path(__import__("tempfile").gettempdir())
                                       / f"switchyard-openai-files-{port}")
    app = build_app(channel, FileStore(folder), cfg.batch_max_file_bytes, cfg.model)

    class _Server(uvicorn.Server):   # signals are run_service's (drain, then stop), not uvicorn's
        @contextlib.contextmanager
        def capture_signals(self):
            yield

    from common import tls
    ssl_options = tls.uvicorn_ssl_options(tls.current())   # {} without TLS: plain HTTP
    server = _Server(uvicorn.Config(app, host=svc.host, port=port, log_level="warning", access_log=False,
                                    lifespan="off", timeout_graceful_shutdown=cfg.drain_grace_s, **ssl_options))
    task = asyncio.create_task(server.serve(), name="openai-http")
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("the HTTP server stopped during start-up")
        await asyncio.sleep(0.05)
    log.warning("OpenAI-compatible API on %s://%s:%d/v1 (router %s)", "https" if ssl_options else "http",
                svc.host, port, svc.args.router or cfg.router_address)

    async def drain(grace: float) -> None:   # stop accepting; open streams get the grace to finish
        server.should_exit = True
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), grace + 1.0)

    async def stop() -> None:
        server.should_exit = server.force_exit = True
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(task, 5.0)

    svc.on_drain(drain)
    svc.on_stop(stop)


def main(argv: list[str] | None = None) -> None:
    run_service("openai_http", start, description="Switchyard OpenAI-compatible HTTP front door",
                flags=("port", "host", "router"), argv=argv)


if __name__ == "__main__":
    main()
