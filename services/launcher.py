"""`switchyard up`: nats-server, kv_manager, router and N batcher+worker pairs as child processes.

Start order: nats -> kv_manager -> workers -> batchers -> router; ready when the router reports
every worker healthy. Stop order (SIGTERM / Ctrl-C) is the drain: router first (NOT_SERVING,
open streams finish within the grace period), then batchers, workers, kv_manager, nats last.
Every child lives in its own process group and dies with the launcher (common/proc.py).

Supervision (services/supervision.py): while up, a child that dies is started again with backoff
(0.5 s doubling to 10 s, reset after a minute up); a batcher and its worker as a pair (the other is
killed, both start again), nats-server on the same port and store (every service reconnects).
Each unit's state (up / restarting since, restarts, last exit code) is in stack.json under
`services`, which `switchyard status` shows. A clean stop restarts nothing.

Work directory: logs/ (one <child>.log each), the nats store and stack.json. Without `--workdir` it
is a fresh temp folder, removed after a clean stop and kept (and named) when the stack failed.
"""
from __future__ import annotations

import ipaddress
import json
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from common import proc
from common.config import StackConfig, write_config
from common.ports import check_free, free_port
from services import nats_server
from services.embedding_pairs import EmbeddingPairs
from services.machine_defaults import MachineDefaults
from services.supervision import Unit


class StackError(RuntimeError):
    pass


class Stack:
    def __init__(self, cfg: StackConfig, workdir: str | Path | None = None):
        self.owns_workdir = not workdir   # a temp folder of our own: removed after a clean stop
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="switchyard-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_dir = self.workdir / "logs"
        try:
            self.cfg = self._resolve_ports(cfg)
            self.cfg = self._resolve_tls(self.cfg)
            if self.cfg.http_port is not None and not self.cfg.http_files_dir:   # uploads live with the stack
                self.cfg = replace(self.cfg, http_files_dir=str(self.workdir / "openai-files"))
        except BaseException:   # a port taken: nothing was started, nothing to keep
            self.remove_workdir()
            raise
        self.config_path = write_config(self.cfg, self.workdir / "stack-config.json")
        self.nats: proc.Child | None = None
        self.kv_manager: proc.Child | None = None
        self.router: proc.Child | None = None
        self.workers: list[proc.Child] = []
        self.batchers: list[proc.Child] = []
        self.embedding = EmbeddingPairs(self)          # embedding worker + batcher pairs e0, e1, ...
        self.worker_ports: list[int] = []
        self.metrics_ports: dict[str, int] = {}   # child name -> its /metrics port (free ones)
        self.triton_front: proc.Child | None = None   # `--triton-port`: services/triton_front.py
        self.http_front: proc.Child | None = None     # `--http-port`: services/openai_http.py (OpenAI API)
        self.pool = None                               # services/pool.PoolManager when cfg.pool_config
        self.units: dict[str, Unit] = {}               # supervised units by name (after start)
        self.stopping = False
        # engine threads, token budget and admission window measured at worker 0's start (issue 19)
        self.machine = MachineDefaults(self.cfg, self.workdir)
        if self.cfg.pool_config:
            from services.pool_setup import make_pool
            self.cfg, self.config_path, self.pool = make_pool(self)

    def _resolve_tls(self, cfg: StackConfig) -> StackConfig:
        """`tls = true` without certificates: development ones in <workdir>/tls (services/certs.py). The
        launcher's own TLS (health checks, the model pool's server and NATS client) is set here."""
        from common import tls
        if cfg.tls and not cfg.tls_dir and not (cfg.tls_ca and cfg.tls_cert and cfg.tls_key):
            from services import certs
            cfg = replace(cfg, tls_dir=str(certs.generate(self.workdir / "tls", hosts=[cfg.host]).resolve()))
        self.tls = tls.settings_from(cfg, "launcher")
        if self.tls is not None:
            tls.configure(self.tls)
        return cfg

    @staticmethod
    def _resolve_ports(cfg: StackConfig) -> StackConfig:
        """Port 0 -> a free port now; a configured port that is taken -> a clear error."""
        h = cfg.host
        pick = lambda p, what: free_port(h) if p == 0 else check_free(p, what, h)  # noqa: E731
        return replace(cfg, router_port=pick(cfg.router_port, "router"), nats_port=pick(cfg.nats_port, "nats"),
                       kv_manager_port=pick(cfg.kv_manager_port, "kv_manager"),
                       triton_port=None if cfg.triton_port is None else pick(cfg.triton_port, "triton"),
                       http_port=None if cfg.http_port is None else pick(cfg.http_port, "http"))

    @property
    def children(self) -> list[proc.Child]:
        pool = self.pool.children() if self.pool is not None else []
        return [c for c in [self.nats, self.kv_manager, *self.workers, *self.batchers, *self.embedding.children(),
                            *pool, self.router,
                            self.triton_front, self.http_front] if c]

    @property
    def router_address(self) -> str:
        return self.cfg.router_address

    def worker_id(self, i: int) -> str:
        return f"w{i}"

    # ---- start ---------------------------------------------------------------------------------
    def _metrics_args(self, name: str) -> list[str]:
        """--metrics-port: a free port the first time, the same one when the child is restarted."""
        port = self.metrics_ports.get(name) or free_port(self.cfg.host)
        self.metrics_ports[name] = port
        return ["--metrics-port", str(port)]

    # One spawner per child, used at start and by the supervisor's restarts (same ports, same args).
    def _spawn_nats(self) -> proc.Child:
        cfg = self.cfg
        from common import tls
        return nats_server.start(cfg.host, cfg.nats_port, self.workdir, cfg.nats_max_payload, self.log_dir,
                                 tls=tls.settings_from(cfg, "nats"))

    def _spawn_kv_manager(self) -> proc.Child:
        return proc.spawn("kv_manager", proc.python_module(
            "kv_manager.main", "--config", str(self.config_path), "--port", str(self.cfg.kv_manager_port),
            *self._metrics_args("kv_manager")), self.log_dir)

    def _spawn_worker(self, i: int) -> proc.Child:
        name = f"worker-{self.worker_id(i)}"
        return proc.spawn(name, proc.python_module(
            "workers.main", "--config", str(self.config_path), "--port", str(self.worker_ports[i]),
            "--worker-id", self.worker_id(i), *self._metrics_args(name)), self.log_dir,
            env=self.machine.worker_env(measures=i == 0))

    def _spawn_batcher(self, i: int) -> proc.Child:
        name = f"batcher-{self.worker_id(i)}"
        if self.cfg.backend != "switchyard":   # external engine: a pass-through batcher, no worker
            return proc.spawn(name, proc.python_module(
                "batcher.passthrough_main", "--config", str(self.config_path), "--worker-id", self.worker_id(i),
                *self._metrics_args(name)), self.log_dir)
        # With defaults from the machine: once worker 0 has measured them (services/machine_defaults.py).
        conf = self.machine.batcher_config(self.cfg, self.config_path, self.workers[0].alive,
                                           self.cfg.startup_timeout_s)
        return proc.spawn(name, proc.python_module(
            "batcher.main", "--config", str(conf), "--worker-id", self.worker_id(i),
            "--worker-addr", f"{self.cfg.host}:{self.worker_ports[i]}", *self._metrics_args(name)), self.log_dir)

    def _spawn_router(self) -> proc.Child:
        return proc.spawn("router", proc.python_module(
            "router.main", "--config", str(self.config_path), "--port", str(self.cfg.router_port),
            *self._metrics_args("router")), self.log_dir)

    def _spawn_triton_front(self) -> proc.Child:
        return proc.spawn("triton_front", proc.python_module(
            "services.triton_front", "--config", str(self.config_path), "--port", str(self.cfg.triton_port)),
            self.log_dir)

    def _spawn_http_front(self) -> proc.Child:
        return proc.spawn("http_front", proc.python_module(
            "services.openai_http", "--config", str(self.config_path), "--port", str(self.cfg.http_port),
            *self._metrics_args("http_front")), self.log_dir)

    def start(self) -> "Stack":
        cfg = self.cfg
        try:
            self.nats = self._spawn_nats()
            self.kv_manager = self._spawn_kv_manager()
            for i in range(cfg.workers if cfg.backend == "switchyard" else 0):  # else: pass-through below
                port = free_port(cfg.host) if cfg.worker_base_port == 0 else check_free(
                    cfg.worker_base_port + i, f"worker {i}", cfg.host)
                self.worker_ports.append(port)
                self.workers.append(self._spawn_worker(i))
            for i in range(cfg.workers if cfg.backend != "switchyard" else len(self.worker_ports)):
                self.batchers.append(self._spawn_batcher(i))
            self.embedding.start()
            self.router = self._spawn_router()
            if cfg.triton_port is not None:
                self.triton_front = self._spawn_triton_front()
            if cfg.http_port is not None:
                self.http_front = self._spawn_http_front()
            self.wait_healthy(cfg.startup_timeout_s)
            if self.pool is not None:   # the catalogue's min_replicas, once the router hears heartbeats
                self.pool.start(cfg.startup_timeout_s)
                self.metrics_ports["pool"] = self.pool.metrics_port
            if self.triton_front:
                self._wait_listening(self.triton_front, cfg.triton_port, 30.0)
            if self.http_front:
                self._wait_listening(self.http_front, cfg.http_port, 60.0)
        except BaseException:
            self.stop(drain=False)
            raise
        self._make_units()
        self._write_state()
        return self

    # ---- supervision ---------------------------------------------------------------------------
    def _make_units(self) -> None:
        units = [Unit("nats", ["nats"]), Unit("kv_manager", ["kv_manager"])]
        for i in range(len(self.batchers)):
            wid = self.worker_id(i)
            units.append(Unit(wid, ([f"worker-{wid}"] if i < len(self.workers) else []) + [f"batcher-{wid}"]))
        units += [Unit(name, members) for name, members in self.embedding.unit_members().items()]
        units.append(Unit("router", ["router"]))
        if self.triton_front:
            units.append(Unit("triton_front", ["triton_front"]))
        if self.http_front:
            units.append(Unit("http_front", ["http_front"]))
        self.units = {u.name: u for u in units}

    def _members(self, unit: Unit) -> list[proc.Child]:
        if unit.name in ("nats", "kv_manager", "router", "triton_front", "http_front"):
            c = getattr(self, unit.name)
            return [c] if c else []
        if self.embedding.owns(unit.name):
            return self.embedding.members(unit.name)
        i = int(unit.name[1:])   # a worker id "w<i>": its worker (if any) and its batcher
        return [*self.workers[i:i + 1], self.batchers[i]]

    def _respawn(self, unit: Unit) -> None:
        if unit.name == "nats":
            self.nats = self._spawn_nats()
        elif unit.name == "kv_manager":
            self.kv_manager = self._spawn_kv_manager()
        elif unit.name == "router":
            self.router = self._spawn_router()
        elif unit.name == "triton_front":
            self.triton_front = self._spawn_triton_front()
        elif unit.name == "http_front":
            self.http_front = self._spawn_http_front()
        elif self.embedding.owns(unit.name):
            self.embedding.respawn(unit.name)
        else:
            i = int(unit.name[1:])
            if i < len(self.workers):   # the worker first: its batcher waits for it
                self.workers[i] = self._spawn_worker(i)
            self.batchers[i] = self._spawn_batcher(i)

    def supervise(self, say=None) -> bool:
        """One look at every unit (the `up` loop calls it a few times a second): a dead member takes its
        unit down (the rest of a pair is killed) and schedules the restart; a unit whose backoff has
        passed is started again. Rewrites stack.json when anything changed; True then."""
        say = say or (lambda msg: print(f"switchyard: {msg}", file=sys.stderr, flush=True))
        changed = False
        for unit in list(self.units.values()):
            if self.stopping:
                return changed
            if unit.state == "up":
                dead = [c for c in self._members(unit) if not c.alive()]
                if dead:
                    wait = unit.died(dead[0].name, dead[0].popen.returncode)
                    for c in self._members(unit):
                        c.stop(1.0)   # the pair's other half (its state refers to the dead one), and leftovers
                    say(f"{dead[0].name} exited with code {dead[0].popen.returncode}; restarting "
                        f"{' + '.join(unit.members)} in {wait:.1f}s (restart {unit.restarts + 1})")
                    changed = True
            if unit.due():
                try:
                    self._respawn(unit)
                except Exception as e:   # e.g. nats-server not ready in time: try again after the next backoff
                    for c in self._members(unit):
                        c.stop(1.0)
                    wait = unit.died(unit.members[-1], None)
                    say(f"restarting {unit.name} failed ({e}); next try in {wait:.1f}s")
                else:
                    unit.restarted()
                    say(f"restarted {' + '.join(unit.members)} (pid "
                        f"{', '.join(str(c.pid) for c in self._members(unit))}; restarts: {unit.restarts})")
                changed = True
        if changed:
            self._write_state()
        return changed

    @property
    def restarts(self) -> int:
        return sum(u.restarts for u in self.units.values())

    def _wait_listening(self, child: proc.Child, port: int, timeout: float) -> None:
        import socket
        deadline = time.monotonic() + timeout
        while True:
            if not child.alive():
                raise StackError(f"{child.name} exited with code {child.popen.returncode} during start-up; "
                                 f"last log lines ({child.log_path}):\n{child.tail()}")
            try:
                socket.create_connection((self.cfg.host, port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise StackError(f"{child.name} not listening on port {port} after {timeout:.0f}s")
                time.sleep(0.1)

    def wait_healthy(self, timeout: float) -> None:
        """Until the router answers SERVING and lists every worker healthy (or a child dies)."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from protos.switchyard.v1 import inference_pb2_grpc, kv_index_pb2

        deadline = time.monotonic() + timeout
        from common import rpc, tls
        creds = tls.channel_credentials(self.tls) if self.tls is not None else None   # this stack's, not the process's
        with (grpc.secure_channel(self.router_address, creds, options=rpc.options()) if creds is not None
              else grpc.insecure_channel(self.router_address)) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            admin = inference_pb2_grpc.AdminStub(ch)
            while True:
                for c in self.children:
                    if not c.alive():
                        raise StackError(f"{c.name} exited with code {c.popen.returncode} during start-up; "
                                         f"last log lines ({c.log_path}):\n{c.tail()}")
                try:
                    h = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if h.status == health_pb2.HealthCheckResponse.SERVING:
                        st = admin.Status(kv_index_pb2.StatusRequest(), timeout=2.0)
                        if sum(1 for w in st.workers if w.healthy) >= self.cfg.workers + self.embedding.count:
                            return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise StackError(f"stack not healthy after {timeout:.0f}s; logs in {self.log_dir}")
                time.sleep(0.2)

    def _write_state(self) -> None:
        state = {"router": self.router_address, "nats": self.cfg.nats_url, "kv_manager": self.cfg.kv_manager_address,
                 "workdir": str(self.workdir), "logs": str(self.log_dir),
                 "pids": {c.name: c.pid for c in self.children},
                 "workers": {self.worker_id(i): {"worker_pid": w.pid, "batcher_pid": b.pid,
                                                 "port": self.worker_ports[i]}
                             for i, (w, b) in enumerate(zip(self.workers, self.batchers))},
                 "embedding_workers": self.embedding.snapshot(),
                 "metrics": self.metrics_endpoints(),
                 "triton": f"{self.cfg.host}:{self.cfg.triton_port}" if self.cfg.triton_port is not None else "",
                 "http": (f"{'https' if self.cfg.tls else 'http'}://{self.cfg.host}:{self.cfg.http_port}/v1"
                          if self.cfg.http_port is not None else ""),
                 "trace_file": self.cfg.trace_file, "otlp_endpoint": self.cfg.otlp_endpoint,
                 "tls": self.tls_state(),
                 "services": {name: {**u.snapshot(), "pids": {c.name: c.pid for c in self._members(u)}}
                              for name, u in self.units.items()}}
        state["tuning"] = self.machine.state()   # defaults chosen from the machine, and why
        if self.pool is not None:
            state["pool"] = {"control": f"{self.cfg.host}:{self.cfg.pool_control_port}", **self.pool.snapshot()}
        text = json.dumps(state, indent=1)
        (self.workdir / "stack.json").write_text(text)
        # Also where `switchyard status` finds it from the router address alone.
        pointer = state_pointer(self.router_address)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.write_text(text)

    def tls_state(self) -> dict:
        """stack.json's "tls": what a local client needs (services/client_tls.py configure_client_tls): the
        CA, and the CLI's client certificate when tls_dir has one; {} without TLS."""
        if self.tls is None:
            return {}
        from common import tls
        d = Path(self.cfg.tls_dir) if self.cfg.tls_dir else None
        cli = d / tls.client_cert_name(tls.CLI_CLIENT) if d else None
        has_cli = cli is not None and cli.with_suffix(".pem").exists()
        return {"ca": self.tls.ca_path, "client_auth": self.cfg.tls_client_auth,
                "client_cert": str(cli.with_suffix(".pem")) if has_cli else "",
                "client_key": str(cli.parent / (cli.name + "-key.pem")) if has_cli else ""}

    def metrics_endpoints(self) -> dict[str, str]:
        """Child name -> host:port of its Prometheus /metrics."""
        return {name: f"{self.cfg.host}:{port}" for name, port in self.metrics_ports.items()}

    # ---- stop ----------------------------------------------------------------------------------
    def stop(self, drain: bool = True) -> None:
        """Drain in dependency order; SIGKILL whatever outlives its timeout."""
        self.stopping = True   # the supervisor restarts nothing from here on
        grace = self.cfg.drain_grace_s if drain else 0.5
        if self.triton_front:   # a client of the router: stops first
            self.triton_front.stop(5.0)
        if self.http_front:     # likewise (open streams get the drain grace)
            self.http_front.stop(grace + 5.0 if drain else 2.0)
        if self.router:
            self.router.stop(grace + 5.0)
        if self.pool is not None:
            self.pool.stop(drain)
        proc.stop_all(self.batchers, grace + 5.0 if drain else 2.0)
        self.embedding.stop(grace + 5.0 if drain else 2.0)
        proc.stop_all(self.workers, 5.0)
        proc.stop_all([c for c in (self.kv_manager,) if c], 5.0)
        if self.nats:
            self.nats.stop(5.0)
        try:
            state_pointer(self.router_address).unlink()
        except OSError:
            pass

    def dead_children(self) -> list[proc.Child]:
        return [c for c in self.children if not c.alive()]

    def remove_workdir(self) -> bool:
        """After a clean stop: delete the temp work directory this stack made (never a `--workdir`)."""
        if not self.owns_workdir:
            return False
        shutil.rmtree(self.workdir, ignore_errors=True)
        return True


_LOCAL_HOSTS = {"", "localhost", "ip6-localhost", "ip6-loopback"}
_TARGET_SCHEME = re.compile(r"^(dns:(//[^/]*/)?|ipv4:|ipv6:)")


def state_key(router_address: str) -> str:
    """The router address as a file name, the same for every spelling of this machine: localhost,
    127.0.0.1, [::1], 0.0.0.0, [::] and its host name all become `local_<port>`."""
    addr = _TARGET_SCHEME.sub("", router_address.strip())
    if addr.startswith("["):                      # [v6]:port
        host, _, port = addr[1:].partition("]")
        port = port.lstrip(":")
    elif addr.count(":") == 1:                    # host:port
        host, port = addr.split(":")
    else:                                         # host alone, or a bare IPv6 address
        host, port = addr, ""
    host = host.lower()
    try:
        ip = ipaddress.ip_address(host)
        local = ip.is_loopback or ip.is_unspecified
    except ValueError:
        local = host in _LOCAL_HOSTS or host == socket.gethostname().lower()
    name = "local" if local else re.sub(r"[^A-Za-z0-9._-]", "_", host)
    return f"{name}_{port}" if port else name


def state_pointer(router_address: str) -> Path:
    """A copy of a running stack's stack.json, keyed by its router address (for `switchyard status`)."""
    return Path(tempfile.gettempdir()) / "switchyard-stacks" / (state_key(router_address) + ".json")


def run_up(cfg: StackConfig, workdir: str | None = None, out=sys.stdout, demo: str | None = None,
           stop: threading.Event | None = None) -> int:
    """Foreground `switchyard up`: start, print the router address, block until SIGTERM/Ctrl-C
    (or until `stop` is set, when given)."""
    if stop is None:
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    stack = Stack(cfg, workdir)
    what = (f"a pool of {len(stack.pool.catalog.models)} model(s) from {cfg.pool_config}" if stack.pool is not None
            else f"{cfg.workers} worker(s) of {cfg.model}")
    print(f"switchyard: starting {what}; logs in {stack.log_dir}", file=out, flush=True)
    try:
        stack.start()
    except Exception as e:
        print(f"switchyard: failed to start: {e}", file=sys.stderr, flush=True)
        print(f"switchyard: logs kept in {stack.log_dir}", file=sys.stderr, flush=True)
        return 1
    print(f"switchyard: router listening on {stack.router_address}", file=out, flush=True)
    if cfg.triton_port is not None:
        print(f"switchyard: Triton gRPC protocol on {cfg.host}:{stack.cfg.triton_port}", file=out, flush=True)
    if stack.cfg.http_port is not None:
        print(f"switchyard: OpenAI-compatible API on http://{cfg.host}:{stack.cfg.http_port}/v1", file=out, flush=True)
    print("switchyard: metrics " + " ".join(f"{n}=http://{a}/metrics" for n, a in stack.metrics_endpoints().items()),
          file=out, flush=True)
    if cfg.trace_file or cfg.otlp_endpoint:
        print(f"switchyard: tracing to {' and '.join(x for x in (cfg.trace_file, cfg.otlp_endpoint) if x)}",
              file=out, flush=True)
    print(f"switchyard: ready (state in {stack.workdir / 'stack.json'}); Ctrl-C to stop", file=out, flush=True)
    if demo:
        from services.client import stream_generate
        print(f"switchyard: demo> {demo}", file=out, flush=True)
        stream_generate(stack.router_address, demo, max_tokens=96, chat=True, out=out)
        print(f"switchyard: try `switchyard generate \"...\" --router {stack.router_address}`; "
              f"Ctrl-C to stop", file=out, flush=True)
    rc = 0
    while not stop.wait(0.25):   # supervise: a dead child is restarted with backoff (services/supervision.py)
        stack.supervise()
    print("switchyard: draining", file=out, flush=True)
    stack.stop(drain=True)
    if stack.restarts or any(u.state != "up" for u in stack.units.values()):   # a child died: keep its logs
        print(f"switchyard: stopped after {stack.restarts} restart(s); logs kept in {stack.log_dir}",
              file=sys.stderr, flush=True)
    elif stack.remove_workdir():
        print(f"switchyard: stopped; removed {stack.workdir}", file=out, flush=True)
    else:
        print(f"switchyard: stopped; logs in {stack.log_dir}", file=out, flush=True)
    return rc
