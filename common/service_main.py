"""One skeleton for every service process: router, batcher, pass-through batcher, kv_manager, worker,
the Triton front door.

    def main(argv=None):
        run_service("router", start, description="...", flags=("port", "host", "nats", "kv-manager", "model"))

`run_service` parses the flags (always --config and --metrics-port; the others from FLAGS by name),
loads the one StackConfig (common/config.py; --model overrides its model), sets up logging
(`log_level`), tracing and /metrics, then runs `start(svc)` while listening for SIGTERM / SIGINT.
`start` builds the service through `svc` (NATS connection, gRPC channels and servers) and registers
what to drain and stop; the skeleton then does the same for everyone:

* start: a signal during start-up cancels it; an error in it is logged, cleaned up and exits 1.
* drain (on the signal): every gRPC server's health goes NOT_SERVING, then the `on_drain` hooks run
  with `drain_grace_s` (the router lets open streams finish, a batcher its running requests).
* stop: gRPC servers stop, then everything registered is closed in reverse order (the service's
  `on_stop`, its channels, NATS last), then tracing flushes.

Plumbing layer (common/): imports only common.config / proc / rpc (and telemetry, nats lazily), never a
service, the launcher, the CLI or the pool.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from typing import Awaitable, Callable, Sequence

from common import proc
from common.config import StackConfig, load_config

log = logging.getLogger("switchyard.service")

# The flags a service may take (by name), beyond --config and --metrics-port, which all take.
FLAGS: dict[str, dict] = {
    "port": dict(type=int, default=None, help="gRPC port (default: the config's)"),
    "host": dict(default=None, help="listen address (default: the config's host)"),
    "nats": dict(default=None, help="NATS URL (default: the config's host and nats_port)"),
    "kv-manager": dict(default=None, help="KV index HOST:PORT (default: the config's)"),
    "router": dict(default=None, help="router HOST:PORT (default: the config's)"),
    "model": dict(default=None, help="model to serve (default: the config's)"),
    "worker-id": dict(default="w0", help="this worker's id"),
    "worker-addr": dict(default=None, help="the worker's HOST:PORT"),
    "served-name": dict(default=None, help="model name to report (model pool: <name>@<version>); "
                                           "default: the model"),
}


async def connect_nats_client(url: str, name: str):
    """nats.connect for a client that outlives nats-server restarts (the launcher restarts a dead one on
    the same port and store): reconnect forever, and say one warning per disconnect and per reconnect
    instead of nats-py's traceback for every failed attempt (and nothing for our own drain/close)."""
    import nats
    import nats.errors
    box: dict = {}

    async def disconnected() -> None:
        nc = box.get("nc")
        if nc is not None and not (nc.is_closed or nc.is_draining):
            log.warning("%s: NATS connection lost; reconnecting", name)

    async def reconnected() -> None:
        log.warning("%s: NATS reconnected", name)

    quiet = (OSError, asyncio.TimeoutError, nats.errors.UnexpectedEOF, nats.errors.StaleConnectionError,
             nats.errors.NoServersError)

    async def error(e: Exception) -> None:   # no traceback; refused connects while the server is down: debug
        log.log(logging.DEBUG if isinstance(e, quiet) else logging.WARNING, "%s: NATS error: %r", name, e)

    from common import tls
    s = tls.current()   # `tls = true`: TLS with this process's certificate, and its service's NATS user
    secure = tls.nats_connect_options(s, name) if s is not None else {}
    if s is not None:
        url = tls.tls_url(url)
    nc = box["nc"] = await nats.connect(url, name=name, allow_reconnect=True, max_reconnect_attempts=-1,
                                        reconnect_time_wait=0.2, disconnected_cb=disconnected,
                                        reconnected_cb=reconnected, error_cb=error, **secure)
    return nc


class GrpcEndpoint:
    """A gRPC server with health (overall + each service) and reflection, bound to one port."""

    def __init__(self, svc: "Service", services: Sequence[str], port: int, grace_s: float):
        from common import rpc
        self._svc = svc
        self.services = list(services)
        self.grace_s = grace_s
        self.server = rpc.server(svc.cfg.max_message_bytes)
        self.health = rpc.add_health_and_reflection(self.server, self.services)
        self.port = rpc.bind(self.server, svc.host, port)
        self.started = False

    async def start(self, serving: bool) -> None:
        """Listen; health says `serving` (False: the caller flips it once ready)."""
        await self.set_serving(serving)
        await self.server.start()
        self.started = True

    async def set_serving(self, serving: bool) -> None:
        from common import rpc
        await rpc.set_serving(self.health, self.services, serving)


class Service:
    """What `start` gets: the config, the parsed flags, and the resources the skeleton cleans up."""

    def __init__(self, name: str, cfg: StackConfig, args: argparse.Namespace):
        self.name = name
        self.cfg = cfg
        self.args = args
        self.endpoints: list[GrpcEndpoint] = []
        self._drain_hooks: list[Callable[[float], Awaitable[None]]] = []
        self._stops = contextlib.AsyncExitStack()

    @property
    def host(self) -> str:
        return getattr(self.args, "host", None) or self.cfg.host

    def port(self, configured: int) -> int:
        """--port if given, else the configured port."""
        p = getattr(self.args, "port", None)
        return configured if p is None else p

    async def connect_nats(self, client_name: str | None = None):
        """A NATS client (--nats, else the config's URL), reconnecting forever; drained last at stop."""
        nc = await connect_nats_client(getattr(self.args, "nats", None) or self.cfg.nats_url, client_name or self.name)
        self.on_stop(lambda: _drain_nats(nc))
        return nc

    def channel(self, target: str):
        """A gRPC aio channel with the config's message limits; closed at stop."""
        from common import rpc
        ch = rpc.channel(target, self.cfg.max_message_bytes)
        self.on_stop(ch.close)
        return ch

    def grpc_server(self, services: Sequence[str], port: int, grace_s: float = 1.0) -> GrpcEndpoint:
        """A gRPC server on host:port; add servicers to `.server`, then `await .start(serving)`.
        It goes NOT_SERVING when the drain begins and stops (grace_s for open calls) first at stop."""
        ep = GrpcEndpoint(self, services, port, grace_s)
        self.endpoints.append(ep)
        return ep

    def on_drain(self, hook: Callable[[float], Awaitable[None]]) -> None:
        """hook(drain_grace_s) runs on SIGTERM/SIGINT, after health went NOT_SERVING, before stop."""
        self._drain_hooks.append(hook)

    def on_stop(self, hook: Callable[[], Awaitable[None]]) -> None:
        """hook() runs at stop, after the gRPC servers stopped; hooks run in reverse order of registration
        (like a `with` stack: what was opened first - NATS - closes last)."""
        self._stops.push_async_callback(hook)

    async def drain(self) -> None:
        for ep in self.endpoints:
            await ep.set_serving(False)
        for hook in self._drain_hooks:
            await hook(self.cfg.drain_grace_s)

    async def stop(self) -> None:
        for ep in self.endpoints:
            if ep.started:
                await ep.server.stop(grace=ep.grace_s)
        await self._stops.aclose()


async def _drain_nats(nc, timeout_s: float = 2.0) -> None:
    """Flush what was published, then close. Bounded: a subscription that never drains (a JetStream pull
    consumer or KV watcher mid-request) would otherwise hold the process for nats-py's 30 s drain timeout."""
    try:
        await asyncio.wait_for(nc.drain(), timeout_s)
    except Exception:   # noqa: BLE001 - timeout or a connection already gone: closing is what is left
        with contextlib.suppress(Exception):
            await nc.close()


def build_parser(description: str, flags: Sequence[str], required: Sequence[str] = ()) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    for name in flags:
        spec = dict(FLAGS[name])
        if name in required:
            spec.pop("default", None)
            spec["required"] = True
            spec["help"] = spec["help"].split(" (default")[0].split("; default")[0]
        ap.add_argument(f"--{name}", **spec)
    # SWITCHYARD_CONFIG: how containers (docker-compose.yml, deploy/) name the file without a flag.
    ap.add_argument("--config", default=os.environ.get("SWITCHYARD_CONFIG") or None,
                    help="stack config file, TOML or JSON (common/config.py); default: $SWITCHYARD_CONFIG")
    ap.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    return ap


async def serve(svc: Service, start: Callable[[Service], Awaitable[None]]) -> bool:
    """Start, wait for SIGTERM/SIGINT, drain, stop. Returns False when a signal cut the start short."""
    from telemetry import tracing
    stop = proc.stop_on_signals()
    starting = asyncio.create_task(start(svc), name=f"{svc.name}-start")
    signalled = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():   # stopped while starting (e.g. a worker still loading its model)
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            return False
        starting.result()         # an error in start-up: exit non-zero with the reason
        await signalled
        await svc.drain()
        return True
    finally:
        signalled.cancel()
        try:
            await svc.stop()
        finally:
            tracing.shutdown()


def run_service(name: str, start: Callable[[Service], Awaitable[None]], *, description: str,
                flags: Sequence[str] = (), required: Sequence[str] = (), tracing_name: str | None = None,
                argv: list[str] | None = None) -> None:
    """A service process's main(): flags, config, logging, tracing, /metrics, then `serve`."""
    args = build_parser(description, flags, required).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s {name} %(levelname)s %(message)s")
    cfg = load_config(args.config, model=getattr(args, "model", None))
    logging.getLogger().setLevel(cfg.log_level.upper())
    from common import tls
    tls.configure(tls.settings_from(cfg, name))   # before any server/channel/NATS connection (common/tls.py)
    from telemetry import metrics, tracing
    tracing.setup_from_config(tracing_name or name, cfg)   # before any server/channel: interceptors
    svc = Service(name, cfg, args)
    metrics.serve(args.metrics_port, svc.host)
    try:
        started = asyncio.run(serve(svc, start))
    except Exception:
        log.exception("%s failed", name)
        sys.exit(1)
    if not started:
        # Threads still busy with the cut-short start (a model load) would hold the exit until done.
        logging.shutdown()
        os._exit(0)
