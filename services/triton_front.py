"""Triton-protocol front door: KServe v2 / Triton `GRPCInferenceService` in front of the router.

`switchyard up --triton-port P` starts this beside the router so that existing `tritonclient`
programs stream tokens from any Switchyard model. Every inference becomes one
`switchyard.v1.Inference/Generate` call on the router, so it takes the whole platform path
(validation, routing, batching, tracing). The servicer is the one generated into
`tritonclient[grpc]` (tritonclient.grpc.service_pb2_grpc), so the wire contract is Triton's.

Each model looks like a decoupled LLM model of Triton's vLLM / TensorRT-LLM backends:
inputs  text_input BYTES[1] (required), stream BOOL[1], max_tokens INT32[1], temperature FP32[1],
        top_k INT32[1], top_p FP32[1], seed / random_seed UINT64[1], sampling_parameters BYTES[1]
        (JSON), exclude_input_in_output BOOL[1], return_num_input_tokens / return_num_output_tokens /
        return_finish_reason BOOL[1]  (all but text_input optional);
outputs text_output BYTES[1], num_input_tokens UINT32[1], num_output_tokens UINT32[1],
        finish_reason BYTES[1].
Bad inputs (missing text_input, a wrong datatype, an unknown input or model) are answered with
Triton's error (INVALID_ARGUMENT / NOT_FOUND on unary calls, `error_message` on the stream)
before anything reaches the router. RepositoryModelLoad/Unload go to the model's batchers as a
NATS request on sy.ctl.<worker> (ModelControl); ListModels then shows the change.
Triton priorities (1 = highest, 0 = default) map to ours as 11 - p (1 -> 10, 10 -> 1).
"""
from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
import uuid

import grpc
import nats.errors
import numpy as np

from common import rpc, subjects
from common.config import StackConfig
from common.waiting import Pulse
from protos.switchyard.v1 import bus_pb2, common_pb2, inference_pb2, inference_pb2_grpc, kv_index_pb2
from router.tenants import TenantTable, forward_metadata
from workers.backends.tritongrpc import load as load_triton

_tg, _aio, pb, pb_grpc, mc, tutils = load_triton()
log = logging.getLogger("switchyard.triton_front")

VERSION = "1"
CONTROL_SETTLE_S = 5.0   # after a load/unload, how long to wait for the router's view to show it
INPUTS = {  # name -> (datatype, model-config type, required)
    "text_input": ("BYTES", mc.TYPE_STRING, True),
    "stream": ("BOOL", mc.TYPE_BOOL, False),
    "max_tokens": ("INT32", mc.TYPE_INT32, False),
    "temperature": ("FP32", mc.TYPE_FP32, False),
    "top_k": ("INT32", mc.TYPE_INT32, False),
    "top_p": ("FP32", mc.TYPE_FP32, False),
    "seed": ("UINT64", mc.TYPE_UINT64, False),
    "random_seed": ("UINT64", mc.TYPE_UINT64, False),
    "sampling_parameters": ("BYTES", mc.TYPE_STRING, False),
    "exclude_input_in_output": ("BOOL", mc.TYPE_BOOL, False),
    "return_num_input_tokens": ("BOOL", mc.TYPE_BOOL, False),
    "return_num_output_tokens": ("BOOL", mc.TYPE_BOOL, False),
    "return_finish_reason": ("BOOL", mc.TYPE_BOOL, False),
}
OUTPUTS = {"text_output": ("BYTES", mc.TYPE_STRING), "num_input_tokens": ("UINT32", mc.TYPE_UINT32),
           "num_output_tokens": ("UINT32", mc.TYPE_UINT32), "finish_reason": ("BYTES", mc.TYPE_STRING)}
_SAMPLING_KEYS = {"max_tokens": int, "temperature": float, "top_k": int, "top_p": float, "min_p": float,
                  "repetition_penalty": float, "presence_penalty": float, "seed": int, "random_seed": int,
                  "ignore_eos": bool}
_FINISH = {1: "stop", 2: "length", 3: "abort"}


class TritonInputError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def _shown(s: str, limit: int = 200) -> str:
    """A client's string (model name, request id, input name) as an error message shows it: one line
    (control characters escaped), at most `limit` characters."""
    s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in s[:limit])
    return s


# ---- decoding a ModelInferRequest -----------------------------------------------------------
def _tensor_value(req, i: int, t):
    """Input i as a numpy array (raw_input_contents or typed contents)."""
    if i < len(req.raw_input_contents):
        raw = req.raw_input_contents[i]
        if t.datatype == "BYTES":
            return tutils.deserialize_bytes_tensor(raw)
        return np.frombuffer(raw, dtype=tutils.triton_to_np_dtype(t.datatype))
    c = t.contents
    for field, conv in (("bytes_contents", None), ("bool_contents", np.bool_), ("int_contents", np.int32),
                        ("int64_contents", np.int64), ("uint_contents", np.uint32), ("uint64_contents", np.uint64),
                        ("fp32_contents", np.float32), ("fp64_contents", np.float64)):
        vals = getattr(c, field)
        if len(vals):
            return np.array(list(vals), dtype=object if conv is None else conv)
    return np.array([])


def _scalar(arr, name: str, rid: str, model: str):
    if arr.size < 1:
        raise TritonInputError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"[request id: {rid}] input '{name}' for model '{model}' has no data")
    v = arr.reshape(-1)[0]
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError as e:   # answered, not dropped: Triton says what is wrong with the input
            raise TritonInputError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"[request id: {rid}] input '{name}' for model '{model}' is not valid UTF-8 "
                                   f"(byte {e.start}: {e.reason})") from None
    return v.item() if hasattr(v, "item") else v


def _param_value(p):
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def _triton_priority(p: int) -> int:
    return 0 if p <= 0 else max(-100, 11 - p)


def parse_request(req, known_models: set[str]) -> tuple[inference_pb2.GenerateRequest, dict]:
    """ModelInferRequest -> (GenerateRequest, options); TritonInputError for anything Triton would reject."""
    rid, model = _shown(req.id), _shown(req.model_name)   # as messages show them; req.model_name is looked up
    if req.model_name not in known_models:
        raise TritonInputError(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{model}' is not found")
    if req.model_version not in ("", VERSION):
        raise TritonInputError(grpc.StatusCode.NOT_FOUND,
                               f"Request for unknown model: '{model}' version {_shown(req.model_version)} is not found")
    values: dict[str, object] = {}
    for i, t in enumerate(req.inputs):
        spec = INPUTS.get(t.name)
        if spec is None:
            raise TritonInputError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"[request id: {rid}] unexpected inference input '{_shown(t.name)}' for model "
                                   f"'{model}'; "
                                   f"expected inputs: {', '.join(INPUTS)}")
        if t.datatype != spec[0]:
            dt = _shown(t.datatype)
            raise TritonInputError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"[request id: {rid}] inference input '{t.name}' data-type is '{dt}', "
                                   f"but model '{model}' expects '{spec[0]}'")
        try:
            arr = _tensor_value(req, i, t)
        except (struct.error, ValueError) as e:   # raw_input_contents that are not a tensor of its datatype
            raise TritonInputError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"[request id: {rid}] input '{t.name}' for model '{model}': raw contents are not "
                                   f"a {t.datatype} tensor ({_shown(str(e))})") from None
        expected = int(np.prod(t.shape)) if len(t.shape) else arr.size
        if arr.size != expected:   # e.g. raw contents of 12 bytes for an INT32 of shape [1]: Triton refuses too
            raise TritonInputError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"[request id: {rid}] input '{t.name}' for model '{model}' has {arr.size} "
                                   f"element(s) but its shape {list(t.shape)} says {expected}")
        values[t.name] = _scalar(arr, t.name, rid, model)
    if "text_input" not in values:
        raise TritonInputError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"[request id: {rid}] expected 1 inputs but got {len(values)} inputs for model "
                               f"'{model}'. Got input(s) {sorted(values)}, but missing required input(s) "
                               f"['text_input']. Please provide all required input(s).")
    for o in req.outputs:
        if o.name not in OUTPUTS:
            raise TritonInputError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"[request id: {rid}] unexpected inference output '{_shown(o.name)}' for model "
                                   f"'{model}'")
    # Sampling: request parameters < sampling_parameters JSON < tensors.
    settings: dict = {}
    for k, p in req.parameters.items():
        if k in _SAMPLING_KEYS or k == "stop":
            settings[k] = _param_value(p)
    if "sampling_parameters" in values:
        try:
            sp = json.loads(values["sampling_parameters"] or "{}")
            if not isinstance(sp, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            raise TritonInputError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"[request id: {rid}] input 'sampling_parameters' must be a JSON object: {e}")
        settings.update(sp)
    settings.update({k: v for k, v in values.items() if k in _SAMPLING_KEYS})
    sampling = common_pb2.SamplingParams()
    try:
        for k, v in settings.items():
            if k == "stop":
                sampling.stop.extend([v] if isinstance(v, str) else list(v))
            elif k == "stop_token_ids":
                sampling.stop_token_ids.extend(int(x) for x in v)
            elif k in ("seed", "random_seed"):
                sampling.seed = int(v)
            elif k == "top_k":
                sampling.top_k = max(0, int(v))   # vLLM's -1 = off is our 0
            elif k in _SAMPLING_KEYS and v is not None:
                setattr(sampling, k, _SAMPLING_KEYS[k](v))
    except (TypeError, ValueError) as e:
        raise TritonInputError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"[request id: {rid}] bad sampling value: {e}")
    prio = req.parameters["priority"].uint64_param if "priority" in req.parameters else 0
    gen = inference_pb2.GenerateRequest(model=model, prompt=str(values["text_input"]), sampling=sampling,
                                        priority=_triton_priority(prio), request_id=uuid.uuid4().hex)
    requested = {o.name for o in req.outputs} or {"text_output"}
    for flag, out in (("return_num_input_tokens", "num_input_tokens"), ("return_num_output_tokens",
                                                                       "num_output_tokens"),
                      ("return_finish_reason", "finish_reason")):
        if values.get(flag):
            requested.add(out)
    opts = {"stream": bool(values.get("stream", False)), "outputs": requested,
            "empty_final": bool(req.parameters["triton_enable_empty_final_response"].bool_param)
            if "triton_enable_empty_final_response" in req.parameters else False}
    return gen, opts


def make_response(req, text: str | None, *, n_out: int = 0, n_in: int = 0, finish: str | None = None,
                  outputs: set[str] = frozenset({"text_output"}), final: bool = False):
    """A ModelInferResponse with the requested outputs (none at all for an empty final response)."""
    resp = pb.ModelInferResponse(model_name=req.model_name, model_version=VERSION, id=req.id)
    if text is not None:
        vals = {"text_output": np.array([text.encode("utf-8")], dtype=np.object_),
                "num_input_tokens": np.array([n_in], dtype=np.uint32),
                "num_output_tokens": np.array([n_out], dtype=np.uint32),
                "finish_reason": np.array([(finish or "").encode()], dtype=np.object_)}
        for name in ("text_output", "num_input_tokens", "num_output_tokens", "finish_reason"):
            if name in outputs:
                arr = vals[name]
                resp.outputs.add(name=name, datatype=OUTPUTS[name][0], shape=[1])
                raw = tutils.serialize_byte_tensor(arr).item() if arr.dtype == np.object_ else arr.tobytes()
                resp.raw_output_contents.append(raw)
    resp.parameters["triton_final_response"].bool_param = final
    return resp


# ---- the servicer ----------------------------------------------------------------------------------
class TritonFront(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, cfg: StackConfig, router_channel: grpc.aio.Channel, nc=None):
        from grpc_health.v1 import health_pb2_grpc
        self.cfg = cfg
        self.nc = nc
        self.stub = inference_pb2_grpc.InferenceStub(router_channel)
        self.admin = inference_pb2_grpc.AdminStub(router_channel)
        self.health = health_pb2_grpc.HealthStub(router_channel)
        self._models: dict[str, int] = {}            # name -> healthy workers (ListModels)
        self._models_at = 0.0

    async def models(self, fresh: bool = False) -> dict[str, int]:
        if fresh or time.monotonic() - self._models_at > 1.0:
            resp = await self.stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5.0,
                                              metadata=forward_metadata())
            self._models = {m.name: m.num_workers for m in resp.models}
            self._models_at = time.monotonic()
        return self._models

    async def _known(self, name: str) -> set[str]:
        models = await self.models()
        if name not in models:
            models = await self.models(fresh=True)
        return set(models)

    async def _require_model(self, name: str, context) -> int:
        models = await self.models(fresh=True)
        if name not in models:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{_shown(name)}' is not found")
        return models[name]

    # -- server
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        from grpc_health.v1 import health_pb2
        try:
            h = await self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
            return pb.ServerReadyResponse(ready=h.status == health_pb2.HealthCheckResponse.SERVING)
        except grpc.aio.AioRpcError:
            return pb.ServerReadyResponse(ready=False)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="switchyard", version="0.1",
                                         extensions=["model_repository", "model_repository(unload_dependents)"])

    # -- models
    async def ModelReady(self, request, context):
        models = await self.models(fresh=True)
        return pb.ModelReadyResponse(ready=models.get(request.name, 0) > 0
                                     and request.version in ("", VERSION))

    async def ModelMetadata(self, request, context):
        await self._require_model(request.name, context)
        resp = pb.ModelMetadataResponse(name=request.name, versions=[VERSION], platform="switchyard")
        for name, (dt, _, _) in INPUTS.items():
            resp.inputs.add(name=name, datatype=dt, shape=[1])
        for name, (dt, _) in OUTPUTS.items():
            resp.outputs.add(name=name, datatype=dt, shape=[-1] if name == "text_output" else [1])
        return resp

    async def ModelConfig(self, request, context):
        await self._require_model(request.name, context)
        cfg = mc.ModelConfig(name=request.name, backend="switchyard", platform="switchyard", max_batch_size=0)
        cfg.model_transaction_policy.decoupled = True
        for name, (_, t, required) in INPUTS.items():
            cfg.input.add(name=name, data_type=t, dims=[1], optional=not required)
        for name, (_, t) in OUTPUTS.items():
            cfg.output.add(name=name, data_type=t, dims=[-1] if name == "text_output" else [1])
        return pb.ModelConfigResponse(config=cfg)

    async def ModelStatistics(self, request, context):
        return pb.ModelStatisticsResponse()

    # -- repository
    async def RepositoryIndex(self, request, context):
        models = await self.models(fresh=True)
        resp = pb.RepositoryIndexResponse()
        for name in sorted(models):
            ready = models[name] > 0
            if request.ready and not ready:
                continue
            resp.models.add(name=name, version=VERSION, state="READY" if ready else "UNAVAILABLE",
                            reason="" if ready else "unloaded or no healthy worker")
        return resp

    async def _control(self, name: str, action: str, context) -> None:
        await self._require_model(name, context)
        if self.nc is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "model control needs NATS; the front door has none")
        st = await self.admin.Status(kv_index_pb2.StatusRequest(), timeout=5.0, metadata=forward_metadata())
        workers = [w.worker_id for w in st.workers if w.model == name]
        if not workers:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"no worker of model '{name}' is reachable right now")
        msg = bus_pb2.ModelControl(action=action, model=name).SerializeToString()
        # The router's view of a worker changes only with its heartbeats: listen to them from before
        # the control (a batcher publishes one before it answers).
        beats = Pulse()

        async def on_beat(_msg) -> None:
            beats.fire()
        subs = [await self.nc.subscribe(subjects.heartbeat(wid), cb=on_beat) for wid in workers]
        try:
            errors = []
            for wid in workers:
                try:
                    r = await self.nc.request(subjects.control(wid), msg, timeout=120.0)
                    rep = bus_pb2.ModelControlReply.FromString(r.data)
                    if not rep.ok:
                        errors.append(f"{wid}: {rep.error}")
                except nats.errors.Error as e:   # timeout, no responders, connection closed
                    errors.append(f"{wid}: {type(e).__name__}: {e}")
            if errors:
                # the workers did not do it (refused, or NATS did not deliver): not a bug of the front door
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"failed to {action} '{_shown(name)}': {_shown('; '.join(errors), 1000)}")
            # Triton's load/unload is synchronous: answer once the router's view shows it (re-read
            # after each heartbeat, for up to CONTROL_SETTLE_S).
            want_ready = action == "load"
            deadline = time.monotonic() + CONTROL_SETTLE_S
            while ((await self.models(fresh=True)).get(name, 0) > 0) != want_ready:
                left = deadline - time.monotonic()
                if left <= 0 or not await beats.wait(left):
                    log.warning("router does not show %s of %r after %.0fs", action, name, CONTROL_SETTLE_S)
                    return
        finally:
            for sub in subs:
                try:
                    await sub.unsubscribe()
                except nats.errors.Error as e:   # NATS closing under us
                    log.debug("unsubscribe: %r", e)

    async def RepositoryModelLoad(self, request, context):
        await self._control(request.model_name, "load", context)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        await self._control(request.model_name, "unload", context)
        return pb.RepositoryModelUnloadResponse()

    # -- inference
    async def _generate(self, gen: inference_pb2.GenerateRequest, timeout: float | None):
        """Yield GenerateResponses; TritonInputError(code, message) on a router error."""
        try:
            async for r in self.stub.Generate(gen, timeout=timeout, metadata=forward_metadata()):
                yield r
        except grpc.aio.AioRpcError as e:
            raise TritonInputError(e.code(), f"{e.code().name}: {e.details()}") from e

    async def ModelInfer(self, request, context):
        try:
            gen, opts = parse_request(request, await self._known(request.model_name))
            text, n_in, n_out, finish = "", 0, 0, None
            async for r in self._generate(gen, context.time_remaining()):
                text += r.text
                n_out += len(r.token_ids)
                if r.finish_reason:
                    finish, n_in = _FINISH.get(r.finish_reason), r.usage.prompt_tokens
                    n_out = r.usage.completion_tokens or n_out
        except TritonInputError as e:
            await context.abort(e.code, e.message)
            return
        return make_response(request, text, n_out=n_out, n_in=n_in, finish=finish, outputs=opts["outputs"],
                             final=True)

    async def _stream_one(self, request, out: asyncio.Queue) -> None:
        """One request of a ModelStreamInfer: its responses (or its error) onto out."""
        try:
            gen, opts = parse_request(request, await self._known(request.model_name))
            stream, outputs = opts["stream"], opts["outputs"]
            text, n_out = "", 0
            async for r in self._generate(gen, None):
                n = len(r.token_ids)
                last = bool(r.finish_reason)
                finish = _FINISH.get(r.finish_reason) if last else None
                n_in = r.usage.prompt_tokens if last else 0
                if stream:
                    if r.text or n or last:
                        out.put_nowait(pb.ModelStreamInferResponse(infer_response=make_response(
                            request, r.text, n_out=n, n_in=n_in, finish=finish, outputs=outputs,
                            final=last and not opts["empty_final"])))
                else:
                    text += r.text
                    n_out += n
                    if last:
                        out.put_nowait(pb.ModelStreamInferResponse(infer_response=make_response(
                            request, text, n_out=r.usage.completion_tokens or n_out, n_in=n_in, finish=finish,
                            outputs=outputs, final=not opts["empty_final"])))
            if opts["empty_final"]:
                out.put_nowait(pb.ModelStreamInferResponse(infer_response=make_response(request, None, final=True)))
        except TritonInputError as e:
            out.put_nowait(pb.ModelStreamInferResponse(error_message=f"[request id: {_shown(request.id)}] {e.message}"
                                                       if not e.message.startswith("[request id") else e.message,
                                                       infer_response=pb.ModelInferResponse(
                                                           model_name=request.model_name, id=request.id)))
        except Exception as e:   # never leave a request on the stream unanswered
            log.exception("stream request %s failed", request.id)
            out.put_nowait(pb.ModelStreamInferResponse(
                error_message=f"[request id: {_shown(request.id)}] internal error: {type(e).__name__}",
                infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id)))

    async def ModelStreamInfer(self, request_iterator, context):
        """Decoupled: any number of responses per request; requests on one stream run concurrently."""
        out: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        DONE = object()
        started = 0   # requests handed to a task; each task's None marker follows its last response

        async def reader():
            nonlocal started
            try:
                async for req in request_iterator:
                    if isinstance(req, rpc.Refused):   # did not decode (common/rpc.py): answered, the stream goes on
                        out.put_nowait(pb.ModelStreamInferResponse(error_message=req.message,
                                                                   infer_response=pb.ModelInferResponse()))
                        continue
                    t = asyncio.create_task(self._stream_one(req, out))
                    started += 1
                    tasks.add(t)
                    t.add_done_callback(lambda t: (tasks.discard(t), out.put_nowait(None)))
            finally:
                out.put_nowait(DONE)

        rd = asyncio.create_task(reader())
        reading, finished = True, 0
        try:
            # End once every request's marker came off the queue (not when `tasks` is empty: a task can
            # finish while a response of it still waits in the queue, and that answer would be lost).
            while reading or finished < started:
                item = await out.get()
                if item is DONE:
                    reading = False
                elif item is None:
                    finished += 1
                else:
                    yield item
        finally:
            # Client closed the stream (or cancelled): cancel every request on it, router included.
            rd.cancel()
            for t in list(tasks):
                t.cancel()


async def start(svc) -> None:
    """The front door on the one service skeleton (common/service_main.py): config, logging, tracing,
    signals, drain and stop as every other service."""
    import nats

    cfg = svc.cfg
    channel = svc.channel(svc.args.router or cfg.router_address)
    nc = None
    try:
        nc = await svc.connect_nats("triton_front")
    except (nats.errors.Error, OSError):   # inference still works; load/unload will say why not
        log.warning("no NATS: repository load/unload disabled", exc_info=True)
    front = TritonFront(cfg, channel, nc)
    ep = svc.grpc_server(["inference.GRPCInferenceService"], svc.args.port, grace_s=min(cfg.drain_grace_s, 10.0))
    # undecodable requests: INVALID_ARGUMENT, not UNKNOWN (common/rpc.py)
    # every RPC resolves the caller's tenant (router/tenants.py); its token is forwarded to the router
    rpc.add_checked_servicer(pb_grpc.add_GRPCInferenceServiceServicer_to_server, front, ep.server,
                             cfg.max_request_bytes, authorize=TenantTable(cfg).authorizer())
    await ep.start(True)


def main(argv: list[str] | None = None) -> None:
    from common.service_main import run_service
    run_service("triton_front", start, description="Switchyard Triton-protocol front door (GRPCInferenceService)",
                flags=("port", "host", "router", "nats"), required=("port",), argv=argv)


if __name__ == "__main__":
    main()
