"""The model pool: many models on a fixed set of worker slots, loaded and unloaded while serving.

A replica is one batcher+worker pair serving one version of one model; its heartbeats carry the
served name `<model>@<version>` (common/catalog.served_name), which is how the router finds it.
PoolManager lives in the launcher process (it owns the child processes) and runs its own asyncio
loop in a thread with:

* a NATS client: replica heartbeats (health, waiting + running = queue depth, last use) and
  `sy.ctl.<worker>` ModelControl "unload" to stop a replica taking new requests;
* the internal `switchyard.v1.Pool` gRPC service on StackConfig.pool_control_port, which the
  router's Admin/LoadModel, UnloadModel and Inference/ListModels forward to;
* the scaler loop (services/scaler.py) and a Prometheus registry with queue depth and
  desired/actual replicas per model.

Per model state: unloaded -> loading -> ready -> draining -> unloaded.
* load: place each replica on the slot with the most free memory that fits (memory_gb per
  replica, slot_memory_gb per slot); if none fits, unload the least recently used idle model and
  retry; start the pair; wait until its batcher heartbeats healthy.
* unload (drain): ModelControl "unload" (the batcher stops admitting, the router stops routing and
  re-routes a request that raced it), wait until the replica has no waiting or running requests,
  then SIGTERM batcher and worker.
* hot-swap (load of another version): start the new version's replicas, wait healthy, make it the
  active version (the router prefers it at once), then drain and stop the old replicas.

A model with deployment profiles (common/catalog.py) is one entry per profile, `<model>:<profile>`,
each with its own replicas, scaler state and engine keys; loading or unloading the model by its
bare name does it for every profile.
"""
from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import nats.errors

from common import proc
from common.catalog import Catalog, ModelSpec, served_name, split_profile, write_sources
from common.config import StackConfig, write_config
from common.ports import free_port
from common.replicas import ReplicaTable, ReplicaView
from common.waiting import wait_set
from services.pool_control import PoolError, PoolServicer
from services.scaler import Scaler

log = logging.getLogger("switchyard.pool")

UNLOADED, LOADING, READY, DRAINING = "unloaded", "loading", "ready", "draining"
STATES = (LOADING, READY, DRAINING, UNLOADED)


@dataclass
class Replica:
    worker_id: str
    model: str
    version: str
    served: str
    slot: int
    memory_gb: float
    port: int
    worker: proc.Child
    batcher: proc.Child
    state: str = LOADING
    started: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    view: ReplicaView | None = None             # its entry in PoolManager.table, from its first heartbeat

    @property
    def hb(self):
        """Its last bus_pb2.Heartbeat (None before the first)."""
        return self.view.heartbeat if self.view is not None else None

    @property
    def hb_at(self) -> float:
        return self.view.last_seen if self.view is not None else 0.0

    @property
    def queue_depth(self) -> int:
        return self.view.reported_load if self.view is not None else 0

    def children(self) -> list[proc.Child]:
        return [self.worker, self.batcher]


@dataclass
class ModelEntry:
    spec: ModelSpec
    version: str                                # active version (takes traffic)
    source: str
    state: str = UNLOADED
    last_used: float = field(default_factory=time.monotonic)
    desired: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", s)


def replica_config(cfg: StackConfig, catalog: Catalog, spec: ModelSpec, source: str) -> StackConfig:
    """The StackConfig a replica of `spec` runs with: the stack's, with model = source, the model's own
    [models.engine] keys over the stack's engine, max_model_len capped at the model's max_context, and
    the catalogue's adapters on this base. The worker takes its `engine` whole."""
    engine = replace(cfg.engine, **spec.engine)
    max_len = spec.max_context if engine.max_model_len is None else min(spec.max_context, engine.max_model_len)
    # The catalogue's adapters on this base are served from the replica's first heartbeat; ones
    # added at run time (Admin/LoadAdapter) the router pushes (router/adapter_control.py).
    model = split_profile(spec.name)[0]   # a profile's deployment serves its model's adapters
    adapters = {**engine.lora_adapters, **{a.name: a.path for a in catalog.adapters if a.base == model}}
    return replace(cfg, model=source, workers=max(1, catalog.pool.slots), gpu_usd_per_hour=spec.gpu_usd_per_hour,
                   engine=replace(engine, max_model_len=max_len, lora_adapters=adapters))


class PoolMetrics:
    def __init__(self, registry):
        from prometheus_client import Counter, Gauge, Histogram

        from telemetry import metrics as M
        self.queue_depth = Gauge(M.MODEL_QUEUE_DEPTH, "Waiting + running requests over a model's replicas",
                                 ("model",), registry=registry)
        self.replicas = Gauge(M.MODEL_REPLICAS, "Replicas (batcher+worker pairs) of a model, by state",
                              ("model", "state"), registry=registry)
        self.desired = Gauge(M.MODEL_REPLICAS_DESIRED, "Replicas the scaler wants for a model",
                             ("model",), registry=registry)
        self.state = Gauge(M.MODEL_STATE, "1 for the model's current pool state", ("model", "state"),
                           registry=registry)
        self.loads = Counter(M.MODEL_LOADS, "Model loads, by outcome", ("model", "outcome"), registry=registry)
        self.load_time = Histogram(M.MODEL_LOAD_TIME, "Time from starting a replica to its first healthy heartbeat",
                                   ("model",), registry=registry,
                                   buckets=(0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.evictions = Counter(M.MODEL_EVICTIONS, "Models unloaded to make room (LRU, idle)", ("model",),
                                 registry=registry)


class PoolManager:
    def __init__(self, cfg: StackConfig, catalog: Catalog, workdir: Path, log_dir: Path):
        self.cfg = cfg
        self.catalog = catalog
        self.workdir = Path(workdir)
        self.log_dir = log_dir
        self.pool_dir = self.workdir / "pool"
        self.pool_dir.mkdir(parents=True, exist_ok=True)
        self.sources_path = self.workdir / "model-sources.json"
        self.models: dict[str, ModelEntry] = {}
        self.replicas: dict[str, Replica] = {}      # worker id -> replica
        self._stopping: dict[str, Replica] = {}     # being stopped: still holds its slot memory
        self.scaler = Scaler(catalog.pool.scaler)
        self.metrics_port: int | None = None
        self._counter = 0
        self._sources: dict[str, str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._stop_event: asyncio.Event | None = None
        self._nc = None
        # The replicas' heartbeats (common/replicas.py); loads and drains wait on its `changed` pulse. No
        # expiry sweep: a replica leaves it when the pool stops it, and a dead one is reaped by scale_once.
        self.table = ReplicaTable(cfg.worker_timeout_s)
        self._server = None
        self._tasks: set[asyncio.Task] = set()
        from prometheus_client import CollectorRegistry
        self.registry = CollectorRegistry()
        self.metrics = PoolMetrics(self.registry)
        for m in catalog.deployments():
            self._register_source(m.name, m.version, m.source)
            for v, src in m.versions.items():
                self._register_source(m.name, v, src)
        write_sources(self.sources_path, self._sources)

    # ---- sync API for the launcher --------------------------------------------------------------
    def start(self, timeout: float) -> None:
        """Start the loop thread: NATS, control server, min_replicas of every model; wait ready."""
        self._thread = threading.Thread(target=self._thread_main, name="pool", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"model pool not ready after {timeout:.0f}s; logs in {self.log_dir}")
        if self._start_error is not None:
            raise self._start_error

    def stop(self, drain: bool = True) -> None:
        loop = self._loop
        if loop is not None and self._stop_event is not None and loop.is_running():
            loop.call_soon_threadsafe(self._stop_event.set)
            if self._thread is not None:
                self._thread.join(self.cfg.drain_grace_s + 30.0 if drain else 15.0)
        # Whatever is left (the thread died or timed out): stop it here.
        left = [*self.replicas.values(), *self._stopping.values()]
        proc.stop_all([r.batcher for r in left], 5.0)
        proc.stop_all([r.worker for r in left], 5.0)

    def children(self) -> list[proc.Child]:
        return [c for r in list(self.replicas.values()) for c in r.children()]

    def call(self, coro, timeout: float | None = None):
        """Run a coroutine on the pool loop from another thread (tests, benchmarks)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # ---- loop thread -------------------------------------------------------------------------------
    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:
            log.exception("pool loop failed")
            if not self._ready.is_set():
                self._start_error = e
                self._ready.set()

    async def _main(self) -> None:
        from common import rpc, subjects
        from protos.switchyard.v1 import pool_pb2_grpc
        from telemetry import metrics as M

        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        for m in self.catalog.deployments():
            self.models[m.name] = ModelEntry(m, m.version, m.source)
        from common.service_main import connect_nats_client
        self._nc = await connect_nats_client(self.cfg.nats_url, "pool")
        await self._nc.subscribe(subjects.ALL_HEARTBEATS, cb=self._on_heartbeat)
        self._server = rpc.server(self.cfg.max_message_bytes)
        pool_pb2_grpc.add_PoolServicer_to_server(PoolServicer(self), self._server)
        rpc.bind(self._server, self.cfg.host, self.cfg.pool_control_port)
        await self._server.start()
        self.metrics_port = M.serve(free_port(self.cfg.host), self.cfg.host, registry=self.registry)
        try:
            await asyncio.gather(*(self.load(m.name, replicas=m.min_replicas, wait=True)
                                   for m in self.catalog.deployments() if m.min_replicas > 0))
        except BaseException as e:
            self._start_error = e
            self._ready.set()
            await self._shutdown(drain=False)
            return
        self._ready.set()
        scaler = asyncio.create_task(self._scaler_loop(), name="pool-scaler")
        await self._stop_event.wait()
        scaler.cancel()
        await self._shutdown(drain=True)

    async def _shutdown(self, drain: bool) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._server is not None:
            await self._server.stop(0.5)
        reps = list(self.replicas.values())
        loop = asyncio.get_running_loop()
        grace = self.cfg.drain_grace_s + 5.0 if drain else 2.0
        await loop.run_in_executor(None, proc.stop_all, [r.batcher for r in reps], grace)
        await loop.run_in_executor(None, proc.stop_all, [r.worker for r in reps], 5.0)
        self.replicas.clear()
        if self._nc is not None:
            try:
                await self._nc.close()
            except nats.errors.Error as e:   # closing a connection that is going anyway
                log.debug("pool NATS close: %r", e)

    def _spawn_task(self, coro, name: str) -> asyncio.Task:
        t = asyncio.create_task(coro, name=name)
        self._tasks.add(t)
        t.add_done_callback(self._task_done)
        return t

    def _task_done(self, t: asyncio.Task) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.warning("pool task %s failed: %s", t.get_name(), t.exception())

    # ---- heartbeats -------------------------------------------------------------------------------
    async def _on_heartbeat(self, msg) -> None:
        from protos.switchyard.v1 import bus_pb2
        hb = bus_pb2.Heartbeat.FromString(msg.data)
        r = self.replicas.get(hb.worker_id)
        if r is None:
            return
        r.view = self.table.observe(hb)
        entry = self.models.get(r.model)
        if entry is not None and r.view.active:   # requests queued or running, or tokens generated since
            entry.last_used = r.view.last_seen

    # ---- state -------------------------------------------------------------------------------
    def _register_source(self, name: str, version: str, source: str) -> None:
        self._sources.setdefault(split_profile(name)[0], source)   # the bare model name of a profile too
        self._sources.setdefault(name, source)
        self._sources[served_name(name, version)] = source

    def _profiles_of(self, name: str) -> list[str]:
        """The deployment names of a catalogue model with profiles named bare; else []."""
        m = self.catalog.get(name)
        return self.catalog.deployment_names(name) if m is not None and m.profiles else []

    def entry(self, name: str) -> ModelEntry:
        e = self.models.get(name)
        if e is None:
            raise PoolError("NOT_FOUND", f"model {name!r} is not in the catalogue; known models: "
                                         f"{', '.join(sorted(self.models))}")
        return e

    def replicas_of(self, name: str, version: str | None = None, states=(LOADING, READY, DRAINING)) -> list[Replica]:
        return [r for r in self.replicas.values()
                if r.model == name and (version is None or r.version == version) and r.state in states]

    def slot_used(self) -> list[float]:
        used = [0.0] * self.catalog.pool.slots
        for r in [*self.replicas.values(), *self._stopping.values()]:
            used[r.slot] += r.memory_gb
        return used

    def _refresh_state(self, e: ModelEntry) -> None:
        reps = self.replicas_of(e.spec.name)
        if any(r.state == READY and r.version == e.version for r in reps):
            e.state = READY
        elif any(r.state == LOADING for r in reps):
            e.state = LOADING
        elif reps:
            e.state = DRAINING
        else:
            e.state = UNLOADED

    def queue_depth(self, name: str) -> int:
        return sum(r.queue_depth for r in self.replicas_of(name, states=(READY, DRAINING)))

    # ---- placement and eviction --------------------------------------------------------------------
    def _fit_slot(self, mem: float) -> int | None:
        used = self.slot_used()
        budget = self.catalog.pool.slot_memory_gb
        best = None
        for i, u in enumerate(used):
            if u + mem <= budget + 1e-9 and (best is None or u < used[best]):
                best = i
        return best

    def _eviction_candidate(self, exclude: str) -> ModelEntry | None:
        idle = [e for e in self.models.values()
                if e.spec.name != exclude and e.state == READY and not e.lock.locked()
                and self.queue_depth(e.spec.name) == 0]
        return min(idle, key=lambda e: e.last_used) if idle else None

    async def _place(self, name: str, mem: float, evict: bool, evicted: list[str]) -> int:
        while True:
            slot = self._fit_slot(mem)
            if slot is not None:
                return slot
            victim = self._eviction_candidate(name) if evict else None
            if victim is None:
                used = ", ".join(f"slot {i}: {u:.2f}/{self.catalog.pool.slot_memory_gb:.2f} GB"
                                 for i, u in enumerate(self.slot_used()))
                raise PoolError("RESOURCE_EXHAUSTED", f"no worker slot has {mem:.2f} GB free for {name} ({used}) "
                                                      f"and no idle model can be evicted; unload one or retry")
            log.warning("evicting %s (least recently used, idle) to make room for %s", victim.spec.name, name)
            self.metrics.evictions.labels(victim.spec.name).inc()
            evicted.append(victim.spec.name)
            async with victim.lock:
                await self._drain_replicas(victim, self.replicas_of(victim.spec.name))
                self._refresh_state(victim)
                self.scaler.forget(victim.spec.name)

    # ---- replicas ------------------------------------------------------------------------------------
    def _model_config_path(self, e: ModelEntry, version: str, source: str) -> Path:
        mcfg = replica_config(self.cfg, self.catalog, e.spec, source)
        return write_config(mcfg, self.pool_dir / f"{_safe(e.spec.name)}@{_safe(version)}.json")

    async def _start_replica(self, e: ModelEntry, version: str, source: str, slot: int) -> Replica:
        self._counter += 1
        wid = f"{_safe(e.spec.name)[:40]}-{_safe(version)[:12]}-{self._counter}"
        served = served_name(e.spec.name, version)
        conf = str(self._model_config_path(e, version, source))
        host = self.cfg.host
        port = free_port(host)
        wport, bport = free_port(host), free_port(host)
        worker = proc.spawn(f"worker-{wid}", proc.python_module(
            "workers.main", "--config", conf, "--port", str(port), "--worker-id", wid, "--served-name", served,
            "--metrics-port", str(wport)), self.log_dir)
        batcher = proc.spawn(f"batcher-{wid}", proc.python_module(
            "batcher.main", "--config", conf, "--worker-id", wid, "--worker-addr", f"{host}:{port}",
            "--metrics-port", str(bport)), self.log_dir)
        r = Replica(wid, e.spec.name, version, served, slot, e.spec.memory_gb, port, worker, batcher)
        self.replicas[wid] = r
        log.warning("pool: starting %s (%s from %s) on slot %d", wid, served, source, slot)
        return r

    async def _wait_heartbeats(self, until, timeout: float, watch: list[proc.Child]) -> proc.Child | bool:
        """Wait until `until()` holds, re-checked on every replica heartbeat: True. False once `timeout`
        has passed. The child in `watch` that exited first, if one does before either."""
        waiter = asyncio.ensure_future(self.table.changed.wait_for(until, timeout))
        exits = {asyncio.ensure_future(c.exited()): c for c in watch}
        try:
            done, _ = await asyncio.wait({waiter, *exits}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for f in (waiter, *exits):
                f.cancel()
        if waiter in done:
            return waiter.result()
        return next(c for f, c in exits.items() if f in done)

    async def _wait_ready(self, r: Replica, timeout: float) -> None:
        def healthy() -> bool:
            return r.hb is not None and r.hb.healthy and r.hb.model == r.served
        out = await self._wait_heartbeats(healthy, timeout, r.children())
        if out is True:
            r.state = READY
            r.ready_at = time.monotonic()
            self.metrics.load_time.labels(r.model).observe(r.ready_at - r.started)
            return
        if out is False:
            raise PoolError("DEADLINE_EXCEEDED", f"{r.served} ({r.worker_id}) not healthy after {timeout:.0f}s")
        raise PoolError("INTERNAL", f"{out.name} exited with code {out.popen.returncode} while loading "
                                    f"{r.served}; last log lines:\n{out.tail(15)}")

    async def _add_replicas(self, e: ModelEntry, version: str, source: str, n: int, evict: bool,
                            evicted: list[str]) -> list[Replica]:
        started: list[Replica] = []
        try:
            for _ in range(n):
                slot = await self._place(e.spec.name, e.spec.memory_gb, evict, evicted)
                started.append(await self._start_replica(e, version, source, slot))
            self._refresh_state(e)
            await asyncio.gather(*(self._wait_ready(r, self.catalog.pool.load_timeout_s) for r in started))
            self.metrics.loads.labels(e.spec.name, "ok").inc()
            return started
        except BaseException:
            self.metrics.loads.labels(e.spec.name, "failed").inc()
            await self._stop_replicas(started)
            self._refresh_state(e)
            raise

    async def _stop_replicas(self, reps: list[Replica]) -> None:
        if not reps:
            return
        for r in reps:   # out of the table first: an exit we caused is not a crash to report
            self.replicas.pop(r.worker_id, None)
            self._stopping[r.worker_id] = r
            self.table.remove(r.worker_id)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, proc.stop_all, [r.batcher for r in reps], self.cfg.drain_grace_s + 5.0)
        await loop.run_in_executor(None, proc.stop_all, [r.worker for r in reps], 5.0)
        for r in reps:
            self._stopping.pop(r.worker_id, None)

    async def _drain_one(self, r: Replica) -> None:
        """Stop routing to r, wait until it has no waiting or running requests, stop it."""
        from common import subjects
        from protos.switchyard.v1 import bus_pb2
        r.state = DRAINING
        try:
            await self._nc.request(subjects.control(r.worker_id),
                                   bus_pb2.ModelControl(action="unload", model=r.served).SerializeToString(),
                                   timeout=2.0)
        except nats.errors.Error as ex:   # timeout, no responders: the SIGTERM below drains too
            log.warning("pool: unload control to %s failed (%r); stopping it with SIGTERM", r.worker_id, ex)
        t_sent = time.monotonic()

        def drained() -> bool:   # a heartbeat sent after the unload: unroutable, nothing waiting or running
            hb = r.hb
            return hb is not None and r.hb_at >= t_sent and not hb.healthy and hb.num_running + hb.num_waiting == 0
        await self._wait_heartbeats(drained, self.cfg.drain_grace_s, [r.batcher])
        await self._stop_replicas([r])

    async def _drain_replicas(self, e: ModelEntry, reps: list[Replica]) -> None:
        await asyncio.gather(*(self._drain_one(r) for r in reps))

    # ---- the operations --------------------------------------------------------------------------------
    async def load(self, name: str, version: str = "", source: str = "", replicas: int = 0,
                   wait: bool = True) -> tuple[ModelEntry, list[str], str]:
        """Load (or hot-swap to `version`, or scale up to `replicas`). Returns (entry, evicted, message)."""
        profiles = self._profiles_of(name)
        if profiles:   # the bare name of a model with profiles: every profile
            done = [await self.load(p, version, source, replicas, wait) for p in profiles]
            message = "; ".join(f"{p}: {d[2]}" for p, d in zip(profiles, done))
            return done[0][0], [x for d in done for x in d[1]], message
        e = self.entry(name)
        e.last_used = time.monotonic()
        if not wait:
            self._spawn_task(self.load(name, version, source, replicas, True), f"load-{name}")
            return e, [], "loading in the background"
        async with e.lock:
            version = version or e.version
            src = e.spec.source_for(version, source)
            self._register_source(name, version, src)
            write_sources(self.sources_path, self._sources)
            want = replicas or max(1, e.spec.min_replicas, len(self.replicas_of(name, e.version, (READY,))))
            want = min(want, e.spec.max_replicas)
            evicted: list[str] = []
            current = self.replicas_of(name, e.version, (LOADING, READY))
            if version == e.version and current:
                if len(current) >= want:
                    return e, [], f"{name}@{version} already loaded ({len(current)} replica(s))"
                await self._add_replicas(e, version, src, want - len(current), True, evicted)
                self._refresh_state(e)
                return e, evicted, f"{name}@{version} scaled to {want} replica(s)"
            old = self.replicas_of(name)
            if version == e.version or not old:   # a plain load (maybe of another version: nothing to swap)
                e.version, e.source = version, src
                e.state = LOADING
                await self._add_replicas(e, version, src, want, True, evicted)
                self._refresh_state(e)
                return e, evicted, f"{name}@{version} loaded ({want} replica(s))"
            # Hot-swap: v2 up and healthy first, then traffic moves, then v1 drains.
            await self._add_replicas(e, version, src, want, True, evicted)
            prev = e.version
            e.version, e.source = version, src
            self._refresh_state(e)
            await self._drain_replicas(e, [r for r in old if r.worker_id in self.replicas])
            self._refresh_state(e)
            return e, evicted, f"{name} swapped {prev} -> {version} ({want} replica(s))"

    async def unload(self, name: str, wait: bool = True) -> tuple[ModelEntry, str]:
        profiles = self._profiles_of(name)
        if profiles:
            done = [await self.unload(p, wait) for p in profiles]
            return done[0][0], "; ".join(f"{p}: {d[1]}" for p, d in zip(profiles, done))
        e = self.entry(name)
        if not wait:
            self._spawn_task(self.unload(name, True), f"unload-{name}")
            return e, "draining in the background"
        async with e.lock:
            reps = self.replicas_of(name)
            if not reps:
                return e, f"{name} is not loaded"
            for r in reps:
                r.state = DRAINING
            self._refresh_state(e)
            await self._drain_replicas(e, reps)
            self._refresh_state(e)
            self.scaler.forget(name)
            return e, f"{name} unloaded ({len(reps)} replica(s) drained)"

    # ---- autoscaling ---------------------------------------------------------------------------------
    async def _scaler_loop(self) -> None:
        spec = self.catalog.pool.scaler
        while not await wait_set(self._stop_event, spec.interval_s):   # a tick, cut short by stop()
            try:
                self.scale_once(time.monotonic())
            except Exception:  # noqa: BLE001 - a bug: logged; the scaler goes on with the next tick
                log.exception("scaler tick failed (models %s)", sorted(self.models))

    def scale_once(self, now: float) -> None:
        spec = self.catalog.pool.scaler
        for r in list(self.replicas.values()):   # a replica that died on its own: forget it
            if r.state != LOADING and not all(c.alive() for c in r.children()):
                log.warning("pool: replica %s (%s) exited; removing it", r.worker_id, r.served)
                self._spawn_task(self._stop_replicas([r]), f"reap-{r.worker_id}")
        for name, e in self.models.items():
            self._refresh_state(e)
            qd = self.queue_depth(name)
            active = self.replicas_of(name, e.version, (LOADING, READY))
            self.metrics.queue_depth.labels(name).set(qd)
            for st in (LOADING, READY, DRAINING):
                self.metrics.replicas.labels(name, st).set(len(self.replicas_of(name, states=(st,))))
            for st in STATES:
                self.metrics.state.labels(name, st).set(1 if e.state == st else 0)
            if e.state != READY or e.lock.locked():
                self.metrics.desired.labels(name).set(e.desired if e.state != UNLOADED else 0)
                continue
            d = self.scaler.observe(name, qd, len(active), e.spec.min_replicas, e.spec.max_replicas, now)
            e.desired = d.desired
            self.metrics.desired.labels(name).set(d.desired)
            if not spec.enabled:
                continue
            if d.target > len(active):
                self._spawn_task(self._scale_up(e, d.target - len(active)), f"scale-up-{name}")
            elif d.target < len(active):
                self._spawn_task(self._scale_down(e, len(active) - d.target), f"scale-down-{name}")

    async def _scale_up(self, e: ModelEntry, n: int) -> None:
        if e.lock.locked():
            return
        async with e.lock:
            log.warning("pool: scaling %s up by %d (queue depth %d)", e.spec.name, n, self.queue_depth(e.spec.name))
            for _ in range(n):
                if self._fit_slot(e.spec.memory_gb) is None:
                    break   # the scaler does not evict other models: desired stays above actual
                await self._add_replicas(e, e.version, e.source, 1, False, [])
            self._refresh_state(e)

    async def _scale_down(self, e: ModelEntry, n: int) -> None:
        if e.lock.locked():
            return
        async with e.lock:
            ready = sorted(self.replicas_of(e.spec.name, e.version, (READY,)),
                           key=lambda r: (r.queue_depth, -r.started))
            victims = ready[:n]
            if not victims:
                return
            log.warning("pool: scaling %s down by %d", e.spec.name, len(victims))
            for r in victims:
                r.state = DRAINING
            self._refresh_state(e)
            await self._drain_replicas(e, victims)
            self._refresh_state(e)

    # ---- reporting -----------------------------------------------------------------------------------
    def model_info(self, e: ModelEntry, pb) -> None:
        """Fill an inference_pb2.ModelInfo."""
        self._refresh_state(e)
        s = e.spec
        reps = sorted(self.replicas_of(s.name), key=lambda r: r.worker_id)
        ready = [r for r in reps if r.state == READY]
        pb.name = s.name
        pb.state = e.state
        pb.version = e.version
        pb.source = e.source
        pb.capabilities.extend(s.capabilities)
        pb.replicas = len(ready)
        pb.num_workers = len(ready)
        pb.desired_replicas = e.desired if e.state != UNLOADED else 0
        pb.queue_depth = self.queue_depth(s.name)
        pb.workers.extend(r.worker_id for r in reps)
        pb.memory_gb = s.memory_gb
        pb.gpu_usd_per_hour = s.gpu_usd_per_hour
        pb.min_replicas = s.min_replicas
        pb.max_replicas = s.max_replicas
        pb.idle_s = max(0.0, time.monotonic() - e.last_used)
        lens = [r.hb.max_model_len for r in ready if r.hb is not None and r.hb.max_model_len]
        pb.max_model_len = min(lens) if lens else s.max_context
        for r in reps:
            pb.replica_info.add(worker_id=r.worker_id, version=r.version, served_name=r.served, state=r.state,
                                slot=r.slot, queue_depth=r.queue_depth)

    def snapshot(self) -> dict:
        """A JSON-able view (stack.json, debugging)."""
        return {"slots": self.catalog.pool.slots, "slot_memory_gb": self.catalog.pool.slot_memory_gb,
                "slot_used_gb": self.slot_used(),
                "models": {n: {"state": e.state, "version": e.version,
                               "replicas": [r.worker_id for r in self.replicas_of(n)]}
                           for n, e in self.models.items()}}
