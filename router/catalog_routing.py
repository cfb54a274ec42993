"""Model selection for a model pool (StackConfig.pool_config): which model serves a request.

Order: an explicit `model` (NOT_FOUND lists the catalogue) or `adapter_id` -> required
`capabilities` (the cheapest ready model having them all whose max_context fits the prompt; else
the cheapest that fits, which is then loaded) -> intent (router/intent.py maps prompt + `intent`
hint to a capability, else the default model). LoRA adapters (the catalogue's [[adapters]] and
Admin/LoadAdapter ones, router/adapter_registry.py) take part as models do: `model` may name one,
and one whose capabilities match is a candidate priced as its base model, preferred over the bare
base at equal price (it was declared for that capability). Choosing an adapter routes to its base
model with `adapter_id` set. The decision goes to the client as initial metadata
(`x-switchyard-model`, `x-switchyard-model-version`, `x-switchyard-route-reason`) and onto the
active span. The request is then rewritten to the served name `<model>@<version>` of a version
with routable replicas, so the rest of the router (validation, tokenizer, worker choice over the
heartbeat table, KV index) runs unchanged. A model with no replica triggers a pool load and the
request waits for it (bounded by its deadline and pool_load_wait_s): woken by each heartbeat the
router's worker table takes in, not by a timer.

Deployment profiles (common/catalog.py): a model with profiles is served by one deployment per
profile, `<model>:<profile>`. Once the model is chosen, `pick_profile` picks the deployment: the one
named in `model` ("smollm2:online"; an unknown profile is NOT_FOUND listing the model's), else the
profile serving the request's `service_class` (interactive -> online, batch -> offline by default),
else the model's default profile. `x-switchyard-profile` and the reason go to the client with the rest.

Among replicas the router's usual choice (router/routing.py) runs; `choose_bounded` adds an
imbalance bound so one hot prefix cannot pile every request onto one replica.
"""
from __future__ import annotations

import asyncio
import logging
import time

import grpc

from common.catalog import PROFILE_SEP, Catalog, ModelSpec, load_catalog, split_profile, split_served
from common.waiting import wait_set
from protos.switchyard.v1 import inference_pb2, pool_pb2_grpc
from router import routing
from router.adapter_registry import AdapterEntry
from router.admin_auth import check_admin
from router.intent import load_classifier
from router.validation import RequestError
from telemetry import tracing

log = logging.getLogger("switchyard.router.pool")

POLL_S = 0.25            # the pool's model states (ListModels) are read this often: it pushes nothing
LOAD_RETRY_S = 2.0       # a request waiting for a model re-asks the pool to load it this often


def choose_bounded(cands: list[routing.Candidate], prompt_blocks: int, overlap_weight: float, load_weight: float,
                   policy: str, max_imbalance: int) -> routing.Candidate:
    c = routing.choose(cands, prompt_blocks, overlap_weight, load_weight, policy=policy)
    lo = min(x.load for x in cands)
    if c.load - lo > max_imbalance:
        return min(cands, key=lambda x: (x.load, x.worker_id))
    return c


def pick_profile(catalog: Catalog, name: str, service_class: str) -> tuple[str, str]:
    """A chosen model or served name -> (the deployment to serve it, why; "" when no profile applies).
    'smollm2' -> 'smollm2:online'; 'smollm2@v2' -> 'smollm2:online@v2'; a named profile stays.
    RequestError NOT_FOUND for a profile the model does not have."""
    base, version = split_served(name)
    model, profile = split_profile(base)
    spec = catalog.get(model)
    if spec is None:
        return name, ""
    if profile:
        if profile not in spec.profiles:
            have = ", ".join(sorted(spec.profiles)) or "none (serve it as plain " + repr(model) + ")"
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"model {model!r} has no deployment profile {profile!r}; its profiles: {have}", "model")
        return name, f"profile {profile!r} named in the request"
    if not spec.profiles:
        return name, ""
    profile, why = spec.profile_for(service_class)
    return f"{model}{PROFILE_SEP}{profile}" + (f"@{version}" if version else ""), why


class PoolRouting:
    def __init__(self, router):
        self.router = router
        cfg = router.cfg
        self.catalog = load_catalog(cfg.pool_config)
        self.classifier = load_classifier(self.catalog)
        for a in self.catalog.adapters:   # pushed to their base's replicas by router/adapter_control.py
            router.adapters.add(AdapterEntry(a.name, a.base, a.path, list(a.capabilities), origin="catalogue"))
        from common import rpc
        # No pool control port (a cluster: KEDA scales the replicas): route over what heartbeats.
        self._channel = rpc.channel(f"{cfg.host}:{cfg.pool_control_port}", cfg.max_message_bytes) \
            if cfg.pool_control_port else None
        self.pool = pool_pb2_grpc.PoolStub(self._channel) if self._channel is not None else None
        self.info: dict[str, inference_pb2.ModelInfo] = {}
        self._task: asyncio.Task | None = None
        self._stop = asyncio.Event()

    async def start(self) -> None:
        if self.pool is None:
            return
        self._task = asyncio.create_task(self._poll(), name="router-pool-poll")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
        if self._channel is not None:
            await self._channel.close()

    async def _poll(self) -> None:
        while True:
            try:
                resp = await self.pool.ListModels(inference_pb2.ListModelsRequest(), timeout=2.0)
                self.info = {m.name: m for m in resp.models}
            except grpc.aio.AioRpcError as e:   # the pool starts after the router: keep asking
                log.debug("pool ListModels: %s", e.code())
            if await wait_set(self._stop, POLL_S):
                return

    # ---- which served name ---------------------------------------------------------------------
    def served_names(self, name: str) -> list[str]:
        """Served names (<name>@<version>) with routable replicas, the active version first."""
        served = [s for s in self.router.table.models() if split_served(s)[0] == name]
        info = self.info.get(name)
        active = f"{name}@{info.version}" if info is not None else ""
        return sorted(served, key=lambda s: (s != active, s))

    def is_ready(self, name: str) -> bool:
        """A served name of `name` is routable (a model with profiles: of any of its profiles)."""
        return any(self.served_names(d) for d in self.catalog.deployment_names(name) or [name])

    def _adapters_on_catalogue(self) -> list[tuple[AdapterEntry, ModelSpec]]:
        out = []
        for e in self.router.adapters.all():
            base = self.catalog.get(split_served(e.base)[0])
            if base is not None:
                out.append((e, base))
        return out

    def _by_capability(self, caps: list[str], n_tokens: int) -> tuple[str, str, str]:
        """-> (model, reason, adapter or "")."""
        # (model spec, adapter name or "", capabilities)
        cands = [(m, "", m.capabilities) for m in self.catalog.models]
        cands += [(m, e.name, e.capabilities) for e, m in self._adapters_on_catalogue()]
        have = [c for c in cands if set(caps) <= set(c[2])]
        if not have:
            known = sorted({cap for c in cands for cap in c[2]})
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"no model or adapter has capabilities {caps}; "
                                                          f"capabilities served: {', '.join(known)}", "capabilities")
        fit = [c for c in have if c[0].max_context > n_tokens]
        if not fit:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"prompt: {n_tokens} tokens exceeds the context of every model with {caps} "
                               f"(largest {max(c[0].max_context for c in have)})", "prompt")
        ready = [c for c in fit if self.is_ready(c[0].name)]
        m, adapter, _ = min(ready or fit, key=lambda c: (c[0].gpu_usd_per_hour, not c[1], c[0].name, c[1]))
        what = f"adapter {adapter!r} on {m.name}" if adapter else "model"
        why = f"cheapest ready {what}" if ready else f"cheapest {what} (none ready: loading {m.name})"
        return m.name, f"{why} with {'+'.join(caps)} (${m.gpu_usd_per_hour:g}/h, context {m.max_context})", adapter

    async def _count_tokens(self, request) -> int:
        text = request.prompt or "\n".join(m.content for m in request.messages)
        tok = await self.router.tokenizer(self.catalog.default_model)
        return len(await self.router.run_tokenizer(tok.encode, text))   # off the event loop

    async def select(self, request) -> tuple[str, str, str]:
        """-> (catalogue model name or a served name, reason, adapter or ""). Raises RequestError."""
        if request.model:
            name = request.model
            if self.catalog.get(split_profile(split_served(name)[0])[0]) is not None:
                return name, "model named in the request", ""
            if name in self.router.table.models():   # served outside the catalogue
                return name, "model named in the request", ""
            entry = self.router.adapters.get(name)
            if entry is not None and not request.adapter_id:
                return entry.base, f"adapter {name!r} named in the request (base {entry.base})", name
            known = [*self.catalog.names, *(e.name for e in self.router.adapters.all())]
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"model {name!r} is not served here; known models and adapters: {', '.join(known)}",
                               "model")
        if request.adapter_id:   # the adapter's own base, whatever capabilities or intent would pick
            entry = self.router.adapters.get(request.adapter_id)
            if entry is not None:
                return entry.base, f"base of adapter {entry.name!r}", entry.name
        if request.capabilities:
            caps = sorted({c.strip().lower() for c in request.capabilities if c.strip()})
            return self._by_capability(caps, await self._count_tokens(request))
        text = request.prompt or "\n".join(m.content for m in request.messages)
        cap, why = self.classifier.classify(text, request.intent)
        if cap is not None:
            try:
                name, why2, adapter = self._by_capability([cap], await self._count_tokens(request))
                return name, f"intent: {why}; {why2}", adapter
            except RequestError as e:
                why = f"{why}, but {e.message}"
        return self.catalog.default_model, f"intent: {why}; default model", ""

    async def ensure_served(self, name: str, context) -> str:
        """A served name of `name` with a routable replica; loads the model and waits if there is none."""
        base, version = split_served(name)
        if version:   # a specific version asked for
            if name in self.router.table.models():
                return name
            if self.catalog.deployment(base) is None:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, f"no healthy worker serves {name!r} right now; retry")
        served = self.served_names(base)
        if served and (not version or name in served):
            return name if version else served[0]
        remaining = context.time_remaining() if context is not None else None
        max_wait = self.router.cfg.pool_load_wait_s
        wait = max_wait if remaining is None else min(remaining, max_wait)
        deadline = time.monotonic() + wait

        def routable() -> list[str]:
            served = self.served_names(base)
            return [s for s in served if s == name] if version else served

        next_load = 0.0
        with tracing.span("router.pool_load_wait") if tracing.ENABLED else _null():
            while True:
                now = time.monotonic()
                # Idempotent; repeated in case a load failed or raced an eviction.
                if now >= next_load and self.pool is not None:
                    next_load = now + LOAD_RETRY_S
                    try:
                        await self.pool.LoadModel(inference_pb2.LoadModelRequest(name=base, version=version,
                                                                                  wait=False), timeout=5.0)
                    except grpc.aio.AioRpcError as e:
                        if e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED):
                            raise RequestError(e.code(), e.details()) from None
                        log.warning("pool LoadModel %s: %s", base, e.code())
                served = routable()
                if served:
                    return served[0]
                left = deadline - time.monotonic()
                if left <= 0:
                    code = grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= wait \
                        else grpc.StatusCode.UNAVAILABLE
                    raise RequestError(code, f"model {base!r} is still loading after {wait:.0f}s; retry")
                # A replica becomes routable with a heartbeat: wait for one that shows it (until the
                # next load request is due, or the deadline).
                if self.pool is not None:
                    left = min(left, max(0.0, next_load - time.monotonic()))
                await self.router.table.changed.wait_for(lambda: bool(routable()), left)

    async def route(self, request, context):
        """-> the request rewritten to a served model name. Sends the decision as initial metadata."""
        name, reason, adapter = await self.select(request)
        name, why_profile = pick_profile(self.catalog, name, request.service_class)
        if why_profile:
            reason = f"{reason}; {why_profile}"
        served = await self.ensure_served(name, context)
        base, version = split_served(served)
        base, profile = split_profile(base)
        req = type(request)()
        req.CopyFrom(request)
        req.model = served
        if adapter and not req.adapter_id:
            req.adapter_id = adapter
        req.ClearField("capabilities")
        md = [("x-switchyard-model", base), ("x-switchyard-model-version", version),
              ("x-switchyard-route-reason", reason)]
        if req.adapter_id:
            md.append(("x-switchyard-adapter", req.adapter_id))
        if profile:
            md.append(("x-switchyard-profile", profile))
        try:
            await context.send_initial_metadata(tuple(md))
        except grpc.aio.UsageError as e:   # metadata already sent (cannot happen before the first yield)
            log.debug("route metadata not sent: %s", e)
        if tracing.ENABLED:
            span = tracing.current_span()
            if span is not None:
                span.set_attributes({"switchyard.route.model": base, "switchyard.route.profile": profile,
                                     "switchyard.route.version": version,
                                     "switchyard.route.reason": reason, "switchyard.route.adapter": req.adapter_id})
        return req

    async def reroute(self, served: str, token_ids: list[int], failed_worker: str, context,
                      adapter_id: str | None = None) -> str | None:
        """A replica refused a request before any token (it was being unloaded): another worker, or None."""
        try:
            served2 = await self.ensure_served(split_served(served)[0], context)
            wid = await self.router._pick_worker(served2, token_ids, adapter_id)
        except RequestError:
            return None
        return None if wid == failed_worker else wid

    # ---- Admin / ListModels ------------------------------------------------------------------------
    async def admin(self, method: str, request, context):
        check_admin(context, self.router.cfg)
        if self.pool is None:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, "no model pool control here (pool_control_port "
                                                                    "unset): scale replicas with the orchestrator")
        try:
            return await getattr(self.pool, method)(request, timeout=self.catalog.pool.load_timeout_s + 60.0)
        except grpc.aio.AioRpcError as e:
            raise RequestError(e.code(), e.details()) from None

    async def list_models(self) -> inference_pb2.ListModelsResponse:
        if self.pool is None:   # the catalogue plus what heartbeats
            resp = inference_pb2.ListModelsResponse()
            table = self.router.table.models()
            for m in self.catalog.deployments():
                served = self.served_names(m.name)
                ws = [w for s in served for w in table[s]]
                resp.models.add(name=m.name, state="ready" if ws else "unloaded",
                                version=split_served(served[0])[1] if served else m.version,
                                capabilities=m.capabilities, replicas=len(ws), num_workers=len(ws),
                                queue_depth=sum(w.reported_load for w in ws), workers=sorted(w.worker_id for w in ws),
                                memory_gb=m.memory_gb, gpu_usd_per_hour=m.gpu_usd_per_hour, source=m.source,
                                min_replicas=m.min_replicas, max_replicas=m.max_replicas, max_model_len=m.max_context)
            return resp
        try:
            return await self.pool.ListModels(inference_pb2.ListModelsRequest(), timeout=5.0)
        except grpc.aio.AioRpcError as e:
            raise RequestError(grpc.StatusCode.UNAVAILABLE,
                               f"the model pool is not answering ({e.code().name})") from None


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False
