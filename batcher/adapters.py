"""The LoRA adapters a batcher admits and advertises, and their load/unload at run time.

The router sends ModelControl "load_adapter" / "unload_adapter" on sy.ctl.<worker>
(router/adapter_control.py). Load: the worker registers and validates it (Worker/LoadAdapter), then
it is admitted and advertised in a heartbeat published at once. Unload: it stops being admitted and
advertised at once (new requests get NOT_FOUND), the requests already accepted for it finish, then
the worker forgets it (Worker/UnloadAdapter). Operations on one adapter run one at a time, in the
order they arrived; different adapters do not wait for each other. The wait for accepted requests
is woken by `requests_changed()`, which the batcher calls whenever a request leaves (finished,
aborted, failed): no polling.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc

from common import rpc
from common.waiting import Pulse
from protos.switchyard.v1 import bus_pb2, worker_pb2, worker_pb2_grpc
from workers.engine.errors import UnknownAdapterError

log = logging.getLogger("switchyard.batcher")

LOAD_TIMEOUT_S = 30.0         # the worker reads and validates the file
UNLOAD_DRAIN_S = 60.0         # default wait for accepted requests (ModelControl.timeout_s overrides)
WORKER_CALL_TIMEOUT_S = 10.0


def reply(ok: bool = True, code: str = "", error: str = "", adapters=(), host_bytes: int = 0
          ) -> bus_pb2.ModelControlReply:
    return bus_pb2.ModelControlReply(ok=ok, code=code, error=error, adapters=sorted(adapters), host_bytes=host_bytes)


class BatcherAdapters:
    """`in_use(name)` counts the accepted (waiting or running) requests for an adapter (the owner
    calls `requests_changed()` when that may have dropped); `publish_heartbeat` announces a change;
    `worker_id` names the worker in messages."""

    def __init__(self, worker_id: str, channel: grpc.aio.Channel, in_use: Callable[[str], int],
                 publish_heartbeat: Callable[[], Awaitable[None]]):
        self.worker_id = worker_id
        self._stub = worker_pb2_grpc.WorkerStub(channel)
        self._in_use = in_use
        self._publish_heartbeat = publish_heartbeat
        self._served: set[str] = set()         # what the worker holds
        self._unloading: set[str] = set()      # held, but no longer admitted (draining)
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task] = set()
        self._released = Pulse()               # fired by requests_changed()

    # ---- what requests may use -----------------------------------------------------------------
    def reset(self, names) -> None:
        """The worker (re)connected: it serves exactly `names` (its start-up config after a restart)."""
        self._served = set(names)

    def advertised(self) -> list[str]:
        return sorted(self._served - self._unloading)

    def check(self, adapter_id: str) -> None:
        """EngineCore.adapter_check: UnknownAdapterError (-> NOT_FOUND) unless admitted now."""
        if adapter_id in self._served and adapter_id not in self._unloading:
            return
        why = " (being unloaded)" if adapter_id in self._unloading else ""
        raise UnknownAdapterError(f"adapter {adapter_id!r} is not served by worker {self.worker_id}{why}; "
                                  f"known adapters: {', '.join(self.advertised()) or 'none'}")

    def requests_changed(self) -> None:
        """An accepted request left (finished, aborted, failed): an unload waiting for it re-counts."""
        self._released.fire()

    # ---- control -------------------------------------------------------------------------------
    def start(self, ctl: bus_pb2.ModelControl) -> asyncio.Task:
        """Run a load_adapter / unload_adapter in its own task (an unload may wait a long time for
        requests to finish; other control messages must not queue behind it); the task's result is
        the reply."""
        async def run() -> bus_pb2.ModelControlReply:
            try:
                if not ctl.adapter:
                    return reply(False, "INVALID_ARGUMENT", f"{ctl.action} needs an adapter name")
                if ctl.action == "load_adapter":
                    return await self.load(ctl.adapter, ctl.path, ctl.timeout_s or LOAD_TIMEOUT_S)
                return await self.unload(ctl.adapter, ctl.timeout_s or UNLOAD_DRAIN_S)
            except Exception as e:   # a bug here: log it, and answer rather than leave the caller to time out
                log.exception("%s %r on worker %s failed", ctl.action, ctl.adapter, self.worker_id)
                return reply(False, "INTERNAL", f"{ctl.action} {ctl.adapter!r} on worker {self.worker_id}: "
                                                f"{type(e).__name__}: {rpc.describe(e)}")
        t = asyncio.create_task(run(), name=f"batcher-{ctl.action}")
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def load(self, name: str, path: str, timeout: float) -> bus_pb2.ModelControlReply:
        async with self._lock(name):
            try:
                r = await self._stub.LoadAdapter(worker_pb2.WorkerAdapterRequest(name=name, path=path),
                                                 timeout=timeout)
            except grpc.aio.AioRpcError as e:
                return reply(False, e.code().name, e.details() or str(e.code()), self.advertised())
            self._served = set(r.adapters)
            await self._publish_heartbeat()   # routable from now on, not from the next beat
            return reply(True, adapters=self.advertised(), host_bytes=r.host_bytes)

    async def unload(self, name: str, drain_s: float) -> bus_pb2.ModelControlReply:
        # Refuse new requests now (check() is what admission calls). The rest runs under the adapter's
        # lock (after a load of it still in progress) in its own task, so a timeout answers the caller
        # without abandoning the unload.
        self._unloading.add(name)
        await self._publish_heartbeat()
        work = asyncio.ensure_future(self._drain_and_unload(name))
        self._tasks.add(work)
        work.add_done_callback(self._tasks.discard)
        try:
            return await asyncio.wait_for(asyncio.shield(work), timeout=drain_s)
        except asyncio.TimeoutError:
            return reply(False, "DEADLINE_EXCEEDED",
                         f"adapter {name!r}: {self._in_use(name)} accepted requests still use it on worker "
                         f"{self.worker_id}; new ones are refused and it is unloaded when they finish",
                         self.advertised())

    async def _drain_and_unload(self, name: str) -> bus_pb2.ModelControlReply:
        async with self._lock(name):
            try:
                if name not in self._served:
                    return reply(False, "NOT_FOUND", f"adapter {name!r} is not served by worker {self.worker_id}",
                                 self.advertised())
                # Accepted requests finish first: nothing accepted is lost. Re-counted each time one
                # leaves (requests_changed), never on a timer.
                await self._released.wait_for(lambda: not self._in_use(name))
                try:
                    r = await self._stub.UnloadAdapter(worker_pb2.WorkerAdapterRequest(name=name),
                                                       timeout=WORKER_CALL_TIMEOUT_S)
                    self._served = set(r.adapters)
                except grpc.aio.AioRpcError as e:
                    if e.code() != grpc.StatusCode.NOT_FOUND:   # NOT_FOUND: gone already (worker restarted)
                        return reply(False, e.code().name, e.details() or str(e.code()), self.advertised())
                    self._served.discard(name)
            finally:
                self._unloading.discard(name)
                await self._publish_heartbeat()
            return reply(True, adapters=self.advertised())

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
