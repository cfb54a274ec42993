"""Triton backend: serve a model by forwarding to a Triton Inference Server over gRPC.

Speaks what Triton LLM deployments (vLLM backend, TensorRT-LLM ensemble / tensorrtllm_backend)
expose on a decoupled model: inputs `text_input` (BYTES), `stream` (BOOL), sampling either as a
`sampling_parameters` JSON string (vLLM backend) or as tensors (`max_tokens`, `temperature`,
`top_k`, `top_p`, `random_seed`/`seed`, ...; TensorRT-LLM), the optional `return_*` flags;
output `text_output` (+ `num_output_tokens`, `finish_reason` when the model has them).
Only inputs the model's metadata declares are sent, with the datatype it declares.

Start: server live + ready, model ready, metadata (needs text_input / text_output), config
(warns when the model is not decoupled). Load/unload: explicit-mode RepositoryModelLoad/Unload.
Cancel: the ModelStreamInfer call is cancelled, which Triton turns into request cancellation.
"""
from __future__ import annotations

import json
import logging
import re
from typing import AsyncIterator

import grpc
import numpy as np

from common import rpc
from workers.backends.base import (
    EXHAUSTED,
    INTERNAL,
    INVALID,
    NOT_FOUND,
    UNAVAILABLE,
    Backend,
    BackendChunk,
    BackendError,
    BackendRequest,
)

log = logging.getLogger("switchyard.backends.triton")

_NP = {"BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
       "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
       "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_}

_GRPC_TO_OURS = {
    grpc.StatusCode.INVALID_ARGUMENT: INVALID, grpc.StatusCode.NOT_FOUND: NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE: UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED: UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED: EXHAUSTED, grpc.StatusCode.CANCELLED: UNAVAILABLE,
    grpc.StatusCode.UNIMPLEMENTED: INVALID, grpc.StatusCode.FAILED_PRECONDITION: UNAVAILABLE,
}


def map_error(err, url: str = "", model: str = "") -> BackendError:
    """A grpc.aio.AioRpcError / tritonclient InferenceServerException / stream error -> BackendError."""
    where = f"Triton at {url} (model {model!r})" if url else "Triton"
    if isinstance(err, BackendError):
        return err
    code = None
    if isinstance(err, grpc.aio.AioRpcError):
        code, msg = err.code(), err.details() or rpc.describe(err)
    else:
        msg = err.message() if hasattr(err, "message") and callable(err.message) else str(err)
        status = err.status() if hasattr(err, "status") and callable(err.status) else None
        if status:
            name = str(status).rsplit(".", 1)[-1]
            code = getattr(grpc.StatusCode, name, None)
    ours = _GRPC_TO_OURS.get(code) if code is not None else None
    if ours is None:  # a Switchyard front door names the status in the stream error: "UNAVAILABLE: ..."
        m = re.search(r"\b(INVALID_ARGUMENT|NOT_FOUND|UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED):", msg or "")
        if m:
            ours = _GRPC_TO_OURS.get(getattr(grpc.StatusCode, m.group(1)))
    if ours is None:  # stream errors carry only text: classify it
        low = (msg or "").lower()
        if "unknown model" in low or "not found" in low:
            ours = NOT_FOUND
        elif "queue size" in low or "exhausted" in low:
            ours = EXHAUSTED
        elif "unexpected" in low or "expected" in low or "invalid" in low or "missing" in low:
            ours = INVALID
        elif "connect" in low or "unavailable" in low:
            ours = UNAVAILABLE
        else:
            ours = INTERNAL
    return BackendError(ours, f"{where}: {msg}", retry_after_ms=200 if ours == EXHAUSTED else 0)


def client_errors() -> tuple[type[BaseException], ...]:
    """What tritonclient's aio client raises: its InferenceServerException, and gRPC's own errors."""
    from workers.backends.tritongrpc import load
    return load()[5].InferenceServerException, grpc.RpcError


class TritonBackend(Backend):
    name = "triton"

    def __init__(self, url: str, model: str, *, model_version: str = "", timeout_s: float = 5.0):
        if not url:
            raise ValueError("the triton backend needs backend_url (host:port of Triton's gRPC endpoint)")
        self.url = url.split("://", 1)[-1]
        self.model = model
        self.model_version = model_version
        self.timeout_s = timeout_s
        self.client = None
        self.inputs: dict[str, str] = {}       # name -> datatype, from ModelMetadata
        self.outputs: dict[str, str] = {}
        self.decoupled: bool | None = None
        self._mods = None

    # ---- lifecycle -------------------------------------------------------------------------
    def _client(self):
        if self.client is None:
            from workers.backends.tritongrpc import load
            self._mods = load()
            self.client = self._mods[1].InferenceServerClient(self.url)
        return self.client

    async def start(self) -> None:
        c = self._client()
        try:
            if not await c.is_server_live(client_timeout=self.timeout_s):
                raise BackendError(UNAVAILABLE, f"Triton at {self.url} is not live")
            if not await c.is_server_ready(client_timeout=self.timeout_s):
                raise BackendError(UNAVAILABLE, f"Triton at {self.url} is not ready")
            if not await c.is_model_ready(self.model, self.model_version, client_timeout=self.timeout_s):
                raise BackendError(UNAVAILABLE, f"model {self.model!r} is not ready on Triton at {self.url} "
                                                f"(load it, or check its repository)")
            meta = await c.get_model_metadata(self.model, self.model_version, as_json=True,
                                              client_timeout=self.timeout_s)
        except client_errors() as e:
            raise map_error(e, self.url, self.model) from e
        self.inputs = {i["name"]: i["datatype"] for i in meta.get("inputs", [])}
        self.outputs = {o["name"]: o["datatype"] for o in meta.get("outputs", [])}
        if self.inputs.get("text_input") != "BYTES":
            raise BackendError(INVALID, f"model {self.model!r} on Triton at {self.url} has no BYTES input "
                                        f"'text_input' (inputs: {sorted(self.inputs)}); not an LLM model")
        if self.outputs.get("text_output") != "BYTES":
            raise BackendError(INVALID, f"model {self.model!r} on Triton at {self.url} has no BYTES output "
                                        f"'text_output' (outputs: {sorted(self.outputs)})")
        try:
            cfg = await c.get_model_config(self.model, self.model_version, as_json=True,
                                           client_timeout=self.timeout_s)
            self.decoupled = bool(cfg.get("config", {}).get("model_transaction_policy", {}).get("decoupled"))
            if not self.decoupled:
                log.warning("model %s on %s is not decoupled: tokens arrive in one response", self.model, self.url)
        except client_errors() as e:   # the config is advisory
            log.debug("model config of %s on %s not read: %s", self.model, self.url, e)
            self.decoupled = None

    async def ready(self) -> bool:
        try:
            return bool(await self._client().is_model_ready(self.model, self.model_version, client_timeout=1.0))
        except client_errors():   # unreachable or not ready: that is the answer
            return False

    async def load(self) -> None:
        try:
            await self._client().load_model(self.model, client_timeout=max(self.timeout_s, 60.0))
        except client_errors() as e:
            raise map_error(e, self.url, self.model) from e

    async def unload(self) -> None:
        try:
            await self._client().unload_model(self.model, client_timeout=max(self.timeout_s, 60.0))
        except client_errors() as e:
            raise map_error(e, self.url, self.model) from e

    async def close(self) -> None:
        if self.client is not None:
            try:
                await self.client.close()
            except client_errors() as e:   # closing a channel that is going anyway
                log.debug("closing the Triton client for %s: %s", self.url, e)
            self.client = None

    # ---- requests --------------------------------------------------------------------------
    def _tensor(self, name: str, value):
        tg = self._mods[0]
        dt = self.inputs[name]
        arr = np.array([value.encode() if isinstance(value, str) else value], dtype=_NP.get(dt, np.object_))
        t = tg.InferInput(name, list(arr.shape), dt)
        t.set_data_from_numpy(arr)
        return t

    def build_inputs(self, req: BackendRequest) -> tuple[list, list]:
        """The request's input tensors (only those the model declares) and requested outputs."""
        tg = self._mods[0]
        sp = req.sampling
        inputs = [self._tensor("text_input", req.prompt_text)]
        have = self.inputs
        if "stream" in have:
            inputs.append(self._tensor("stream", True))
        if "exclude_input_in_output" in have:
            inputs.append(self._tensor("exclude_input_in_output", True))
        if "sampling_parameters" in have:
            params = {"max_tokens": sp.max_tokens, "temperature": sp.temperature, "top_p": sp.top_p,
                      "top_k": sp.top_k if sp.top_k > 0 else -1, "min_p": sp.min_p,
                      "repetition_penalty": sp.repetition_penalty, "presence_penalty": sp.presence_penalty,
                      "ignore_eos": sp.ignore_eos}
            if sp.seed is not None:
                params["seed"] = sp.seed
            if sp.stop:
                params["stop"] = list(sp.stop)
            if sp.stop_token_ids:
                params["stop_token_ids"] = list(sp.stop_token_ids)
            inputs.append(self._tensor("sampling_parameters", json.dumps(params)))
        tensors = {"max_tokens": sp.max_tokens, "temperature": sp.temperature, "top_k": sp.top_k,
                   "top_p": sp.top_p, "min_p": sp.min_p, "repetition_penalty": sp.repetition_penalty,
                   "presence_penalty": sp.presence_penalty, "ignore_eos": sp.ignore_eos}
        if sp.seed is not None:
            tensors["random_seed"] = tensors["seed"] = sp.seed
        for name, value in tensors.items():
            if name in have and (name == "max_tokens" or "sampling_parameters" not in have):
                inputs.append(self._tensor(name, value))
        for flag in ("return_num_output_tokens", "return_num_input_tokens", "return_finish_reason"):
            if flag in have:
                inputs.append(self._tensor(flag, True))
        outputs = [tg.InferRequestedOutput(n) for n in ("text_output", "num_output_tokens", "num_input_tokens",
                                                         "finish_reason") if n in self.outputs]
        return inputs, outputs

    async def generate(self, req: BackendRequest) -> AsyncIterator[BackendChunk]:
        c = self._client()
        if not self.inputs:
            await self.start()
        inputs, outputs = self.build_inputs(req)
        first = {"model_name": self.model, "model_version": self.model_version, "inputs": inputs,
                 "outputs": outputs, "request_id": req.request_id}

        async def requests():
            yield first

        it = c.stream_infer(requests(), stream_timeout=req.deadline_s)
        total = 0
        finished = False
        try:
            async for result, error in it:
                if error is not None:
                    raise map_error(error, self.url, self.model)
                resp = result.get_response()
                text_arr = result.as_numpy("text_output")
                text = b"".join(x if isinstance(x, bytes) else str(x).encode()
                                for x in (text_arr.reshape(-1) if text_arr is not None else ())).decode("utf-8",
                                                                                                      "replace")
                n_arr = result.as_numpy("num_output_tokens") if "num_output_tokens" in self.outputs else None
                n = int(n_arr.reshape(-1).sum()) if n_arr is not None and n_arr.size else (1 if text else 0)
                total += n
                final_p = resp.parameters.get("triton_final_response")
                final = bool(final_p.bool_param) if final_p is not None else self.decoupled is False
                chunk = BackendChunk(text=text, num_new_tokens=n)
                if final:
                    reason_arr = result.as_numpy("finish_reason") if "finish_reason" in self.outputs else None
                    reason = None
                    if reason_arr is not None and reason_arr.size:
                        r = reason_arr.reshape(-1)[0]
                        reason = (r.decode() if isinstance(r, bytes) else str(r)).lower()
                    chunk.finish_reason = reason if reason in ("stop", "length", "abort") else (
                        "length" if total >= req.sampling.max_tokens else "stop")
                    p_arr = result.as_numpy("num_input_tokens") if "num_input_tokens" in self.outputs else None
                    if p_arr is not None and p_arr.size:
                        chunk.prompt_tokens = int(p_arr.reshape(-1)[0])
                    finished = True
                    yield chunk
                    return
                if text or n:
                    yield chunk
            if not finished:  # the server closed the stream without a final response
                raise BackendError(UNAVAILABLE, f"Triton at {self.url} closed the stream before the final response")
        except grpc.aio.AioRpcError as e:
            raise map_error(e, self.url, self.model) from e
        finally:
            # Closing the stream is how a Triton client cancels (the server cancels the request).
            it.cancel()
