"""LoRA adapters at run time, on the router: Admin/LoadAdapter and UnloadAdapter, Inference/ListAdapters,
the wait for an adapter that is registered but not served yet, and reconciliation.

The registry (router/adapter_registry.py, `Router.adapters`) is what should be served; worker
heartbeats (`Heartbeat.adapters`) are what is served. Load sends ModelControl "load_adapter" over
NATS request/reply (`sy.ctl.<worker>`) to every routable worker of the adapter's base in parallel and
registers the adapter once at least one worker holds it. Unload removes it from the registry first
(nothing pushes it back, routing stops waiting for it), then asks every worker advertising it; each
batcher refuses new requests for it at once and lets the accepted ones finish (batcher/adapters.py).

Reconciliation (`plan_pushes`, every RECONCILE_S and when a new worker heartbeats) pushes each
registry entry, whatever its origin, to the healthy, non-draining workers of its base that do not
advertise it: a worker that restarted, or a model pool replica started after the load.
"""
from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Iterable

import grpc
import nats.errors

from common import subjects
from common.catalog import split_served
from common.waiting import wait_set
from protos.switchyard.v1 import bus_pb2, inference_pb2
from router.adapter_registry import AdapterEntry
from router.admin_auth import check_admin
from router.validation import RequestError, invalid

log = logging.getLogger("switchyard.router.adapters")

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
PUSH_TIMEOUT_S = 30.0         # a worker reads and validates the adapter file
UNLOAD_DRAIN_S = 60.0         # default wait for accepted requests using the adapter
RECONCILE_S = 1.0
SETTLE_S = 2.0                # after a push: no re-push until heartbeats had time to show it
RETRY_S = 5.0                 # after a failed push (an adapter that worker cannot serve: do not spin)
WAIT_MAX_S = 10.0             # a request for a registered adapter not served yet waits this long at most


def plan_pushes(entries: Iterable[AdapterEntry], heartbeats: Iterable[bus_pb2.Heartbeat],
                skip: set[tuple[str, str]] = frozenset()) -> list[tuple[str, AdapterEntry]]:
    """(worker id, adapter) pairs to push: every healthy, non-draining worker whose model is an entry's
    base and which does not advertise it, except the pairs in `skip` (a push in flight or held back)."""
    hbs = [hb for hb in heartbeats if hb.healthy and not hb.draining and hb.model]
    out = []
    for e in entries:
        for hb in hbs:
            if e.serves_on(hb.model) and e.name not in hb.adapters and (hb.worker_id, e.name) not in skip:
                out.append((hb.worker_id, e))
    return sorted(out, key=lambda p: (p[0], p[1].name))


def check_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise invalid("name", f"must match [A-Za-z0-9_.-]{{1,64}}, got {name!r}")
    return name


def _failure(replies: dict[str, bus_pb2.ModelControlReply]) -> str:
    return "; ".join(f"{w}: {r.code or 'ERROR'}: {r.error}" for w, r in sorted(replies.items()))


class AdapterControl:
    def __init__(self, router):
        self.router = router
        self._busy: set[tuple[str, str]] = set()         # (worker, adapter) loads in flight
        self._hold: dict[tuple[str, str], float] = {}    # (worker, adapter) -> no re-push before (monotonic)
        self._pushes: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def registry(self):
        return self.router.adapters

    # ---- lifecycle -----------------------------------------------------------------------------
    def add_config_adapters(self) -> None:
        """StackConfig.lora_adapters: every worker starts with them; registered so restarted workers and
        later replicas get them back too."""
        for name, path in (self.router.cfg.engine.lora_adapters or {}).items():
            if name not in self.registry:
                self.registry.add(AdapterEntry(name, self.router.cfg.model, str(path), origin="config"))

    async def start(self) -> None:
        self._task = asyncio.create_task(self._reconcile_loop(), name="router-adapter-reconcile")

    async def stop(self) -> None:
        for t in [self._task, *self._pushes]:
            if t is not None:
                t.cancel()

    def worker_joined(self) -> None:
        self._wake.set()   # reconcile now: a new replica should serve the registry before its first request

    # ---- reconciliation ------------------------------------------------------------------------
    async def _reconcile_loop(self) -> None:
        while True:
            await wait_set(self._wake, RECONCILE_S)   # a new worker or a waiting request; else every second
            self._wake.clear()
            try:
                self.reconcile()
            except Exception:  # noqa: BLE001 - a bug: logged; the loop must survive, the next round retries
                log.exception("adapter reconcile failed (registry %s)", sorted(self.names()))

    def reconcile(self) -> None:
        now = time.monotonic()
        self._hold = {k: t for k, t in self._hold.items() if t > now}
        skip = self._busy | set(self._hold)
        hbs = [w.heartbeat for w in self.router.table.workers.values()]
        for wid, entry in plan_pushes(self.registry.all(), hbs, skip):
            self._busy.add((wid, entry.name))
            t = asyncio.create_task(self._push(wid, entry), name=f"router-push-{entry.name}")
            self._pushes.add(t)
            t.add_done_callback(self._pushes.discard)

    async def _push(self, wid: str, entry: AdapterEntry) -> None:
        try:
            r = await self._control(wid, "load_adapter", entry.name, entry.path, PUSH_TIMEOUT_S)
        finally:
            self._busy.discard((wid, entry.name))
        self._hold[(wid, entry.name)] = time.monotonic() + (SETTLE_S if r.ok else RETRY_S)
        if r.ok:
            log.info("adapter %s pushed to worker %s", entry.name, wid)
        else:
            log.warning("adapter %s could not be pushed to worker %s: %s %s", entry.name, wid, r.code, r.error)

    async def _control(self, wid: str, action: str, name: str, path: str = "",
                       timeout: float = PUSH_TIMEOUT_S) -> bus_pb2.ModelControlReply:
        ctl = bus_pb2.ModelControl(action=action, adapter=name, path=path, timeout_s=timeout)
        try:
            # The batcher bounds its own work by timeout_s; the margin covers the trip and the heartbeat.
            msg = await self.router.nc.request(subjects.control(wid), ctl.SerializeToString(), timeout=timeout + 5)
        except (nats.errors.Error, asyncio.TimeoutError) as e:
            return bus_pb2.ModelControlReply(ok=False, code="UNAVAILABLE",
                                             error=f"worker {wid} did not answer {action} ({type(e).__name__})")
        return bus_pb2.ModelControlReply.FromString(msg.data)

    # ---- routing -------------------------------------------------------------------------------
    def resolve_model(self, request: inference_pb2.GenerateRequest) -> inference_pb2.GenerateRequest:
        """`model` naming a registered adapter (and no model) -> its base model with adapter_id set."""
        entry = self.registry.get(request.model) if request.model else None   # a dict lookup for most requests
        if entry is None or (request.adapter_id and request.adapter_id != entry.name) \
                or request.model in self.router.known_models():   # a model of that name wins
            return request
        base = entry.base
        if base not in self.router.known_models():   # a catalogue name: the served name of a worker of it
            base = next((w.model for w in self.router.table.workers.values()
                         if w.routable and entry.serves_on(w.model)), base)
        req = inference_pb2.GenerateRequest()
        req.CopyFrom(request)
        req.model, req.adapter_id = base, entry.name
        return req

    def names(self) -> set[str]:
        return {e.name for e in self.registry.all()}

    async def wait_served(self, model: str, adapter_id: str, context) -> None:
        """A registered adapter no routable worker of `model` advertises yet (just loaded, a worker
        restarted, a replica started): wait for the push instead of failing. Returns when one does or
        the wait is over (the caller's worker choice then answers NOT_FOUND)."""
        entry = self.registry.get(adapter_id)
        if entry is None or not entry.serves_on(model) or self._served(model, adapter_id):
            return
        remaining = context.time_remaining() if context is not None else None
        self._wake.set()   # reconcile now: push it to the workers that lack it
        # Re-checked on every heartbeat the table takes in (and stops if an unload takes it away).
        await self.router.table.changed.wait_for(
            lambda: adapter_id not in self.registry or self._served(model, adapter_id),
            min(WAIT_MAX_S, remaining if remaining is not None else math.inf))

    def _served(self, model: str, adapter_id: str) -> bool:
        return bool(self.router.table.with_adapter(adapter_id, model))

    # ---- Admin / ListAdapters ------------------------------------------------------------------
    def _base(self, base: str) -> str:
        known = self.router.known_models()
        if base:
            if base not in known and split_served(base)[0] not in {split_served(m)[0] for m in known}:
                raise RequestError(grpc.StatusCode.NOT_FOUND, f"base model {base!r} is not served here; known "
                                                              f"models: {', '.join(known) or 'none'}", "base_model")
            return base
        served = {split_served(w.model)[0] for w in self.router.table.workers.values() if w.routable}
        if len(served) == 1:
            return served.pop()
        pool = self.router.pool_routing
        return pool.catalog.default_model if pool is not None else self.router.cfg.model

    async def load(self, request: inference_pb2.LoadAdapterRequest, context) -> inference_pb2.LoadAdapterResponse:
        check_admin(context, self.router.cfg)
        name = check_name(request.name)
        if not request.path:
            raise invalid("path", "the adapter's PEFT folder (adapter_config.json + adapter_model.safetensors) "
                                  "as the workers see it")
        if name in self.router.known_models():
            raise invalid("name", f"{name!r} is a model name; an adapter needs its own name")
        base = self._base(request.base_model)
        old = self.registry.get(name)
        if old is not None and old.path != request.path:
            raise RequestError(grpc.StatusCode.ALREADY_EXISTS,
                               f"adapter {name!r} is already loaded from {old.path}; unload it first", "name")
        entry = AdapterEntry(name, base, request.path,
                             list(request.capabilities) or list(old.capabilities if old else []),
                             origin=old.origin if old is not None else "admin")
        workers = sorted(w.worker_id for w in self.router.table.workers.values()
                         if w.routable and entry.serves_on(w.model))
        if not workers:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"no healthy worker serves base model {base!r} right now; load the model first",
                               "base_model")
        keys = {(w, name) for w in workers}
        self._busy |= keys          # reconcile must not push the same pair meanwhile
        try:
            replies = await asyncio.gather(*(self._control(w, "load_adapter", name, request.path, PUSH_TIMEOUT_S)
                                             for w in workers))
        finally:
            self._busy -= keys
        by_worker = dict(zip(workers, replies))
        ok = sorted(w for w, r in by_worker.items() if r.ok)
        bad = {w: r for w, r in by_worker.items() if r.code == "INVALID_ARGUMENT"}
        if bad:
            # The adapter itself is wrong (the workers of one base agree); take back any copy that loaded.
            if old is None:
                await asyncio.gather(*(self._control(w, "unload_adapter", name, timeout=5.0) for w in ok))
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, next(iter(bad.values())).error, "path")
        if not ok:
            failed = {w: r for w, r in by_worker.items() if not r.ok}
            codes = {r.code for r in failed.values()}
            code = getattr(grpc.StatusCode, codes.pop(), grpc.StatusCode.UNAVAILABLE) if len(codes) == 1 \
                else grpc.StatusCode.UNAVAILABLE
            raise RequestError(code, f"adapter {name!r} could not be loaded: {_failure(failed)}")
        self.registry.add(entry)
        for w in ok:
            self._hold[(w, name)] = time.monotonic() + SETTLE_S
        failed = {w: r for w, r in by_worker.items() if not r.ok}
        msg = f"adapter {name!r} on {base} served by {', '.join(ok)}"
        if failed:
            msg += f"; not yet on {_failure(failed)} (retried by reconciliation)"
        log.info(msg)
        host_mb = max(r.host_bytes for r in replies) / 2**20
        return inference_pb2.LoadAdapterResponse(adapter=self.info(entry), workers=ok, host_mb=host_mb, message=msg)

    async def unload(self, request: inference_pb2.UnloadAdapterRequest,
                     context) -> inference_pb2.UnloadAdapterResponse:
        check_admin(context, self.router.cfg)
        name = request.name
        advertising = {w.worker_id for w in self.router.table.with_adapter(name, routable=False)}
        if name not in self.registry and not advertising:
            known = sorted(self.names() | self._advertised())
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"adapter {name!r} is not loaded; known adapters: "
                                                          f"{', '.join(known) or 'none'}", "name")
        self.registry.remove(name)   # first: no push brings it back, no request waits for it
        # A load still in flight reaches that batcher before this unload (one subject, one connection).
        targets = sorted(advertising | {w for w, a in self._busy if a == name})
        drain = request.drain_timeout_s or UNLOAD_DRAIN_S
        replies = dict(zip(targets, await asyncio.gather(
            *(self._control(w, "unload_adapter", name, timeout=drain) for w in targets))))
        done = sorted(w for w, r in replies.items() if r.ok or r.code == "NOT_FOUND")
        draining = {w: r for w, r in replies.items() if r.code == "DEADLINE_EXCEEDED"}
        failed = {w: r for w, r in replies.items() if w not in done and w not in draining}
        msg = f"adapter {name!r} unloaded" + (f" from {', '.join(done)}" if done else "")
        if draining:
            msg += f"; still finishing accepted requests on {', '.join(sorted(draining))} (new ones are refused)"
        if failed:
            msg += f"; failed on {_failure(failed)}"
        log.info(msg)
        return inference_pb2.UnloadAdapterResponse(workers=done, message=msg)

    def _advertised(self) -> set[str]:
        return self.router.table.adapters()

    def info(self, e: AdapterEntry) -> inference_pb2.AdapterInfo:
        workers = sorted(w.worker_id for w in self.router.table.with_adapter(e.name))
        return inference_pb2.AdapterInfo(name=e.name, base_model=e.base, path=e.path, capabilities=e.capabilities,
                                         origin=e.origin, workers=workers)

    def list_adapters(self, base_model: str = "") -> inference_pb2.ListAdaptersResponse:
        entries = list(self.registry.all())
        # Adapters workers advertise that no registry knows (e.g. a replica's own config): listed too.
        extra: dict[str, str] = {}
        for w in self.router.table.workers.values():
            if w.routable:
                for a in w.heartbeat.adapters:
                    if a not in self.registry:
                        extra.setdefault(a, w.model)
        entries += [AdapterEntry(a, m, "", origin="worker") for a, m in sorted(extra.items())]
        if base_model:
            entries = [e for e in entries if e.serves_on(base_model) or
                       split_served(e.base)[0] == split_served(base_model)[0]]
        return inference_pb2.ListAdaptersResponse(adapters=[self.info(e) for e in entries])
