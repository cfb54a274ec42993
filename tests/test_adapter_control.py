"""Run-time LoRA adapter administration, without processes: the router's reconcile decision
(router/adapter_control.plan_pushes) and the batcher's unload drain (batcher/adapters.py)."""
from __future__ import annotations

import asyncio
import types

import grpc
import pytest

from batcher.adapters import BatcherAdapters
from protos.switchyard.v1 import bus_pb2, inference_pb2, worker_pb2
from router.adapter_control import check_name, plan_pushes
from router.adapter_registry import AdapterEntry
from router.validation import RequestError
from workers.engine.errors import UnknownAdapterError


def hb(wid: str, model: str, adapters=(), healthy=True, draining=False) -> bus_pb2.Heartbeat:
    return bus_pb2.Heartbeat(worker_id=wid, model=model, adapters=list(adapters), healthy=healthy, draining=draining)


SQL = AdapterEntry("sql", "m", "/a/sql", origin="admin")
CHAT = AdapterEntry("chat", "big", "/a/chat", origin="catalogue")


def pairs(plan):
    return [(w, e.name) for w, e in plan]


def test_pushes_go_to_workers_of_the_base_that_lack_the_adapter():
    hbs = [hb("w0", "m", ["sql"]), hb("w1", "m"), hb("w2", "other"), hb("w3", "big@v2"), hb("w4", "big@v1", ["chat"])]
    assert pairs(plan_pushes([SQL, CHAT], hbs)) == [("w1", "sql"), ("w3", "chat")]


def test_no_push_to_unhealthy_or_draining_workers_nor_pairs_in_flight():
    hbs = [hb("w0", "m", healthy=False), hb("w1", "m", draining=True), hb("w2", "m"), hb("w3", "m")]
    assert pairs(plan_pushes([SQL], hbs, skip={("w2", "sql")})) == [("w3", "sql")]


def test_nothing_to_push_when_everything_is_served():
    assert plan_pushes([SQL], [hb("w0", "m", ["sql", "extra"])]) == []
    assert plan_pushes([], [hb("w0", "m")]) == []


def test_adapter_names_are_single_tokens():
    assert check_name("sql-v1.2_x") == "sql-v1.2_x"
    for bad in ("", "a b", "a/b", "x" * 65, "a*"):
        with pytest.raises(RequestError) as e:
            check_name(bad)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


class FakeWorker:
    """Worker/LoadAdapter and UnloadAdapter as the batcher calls them."""

    def __init__(self, names=()):
        self.names = set(names)
        self.calls: list[str] = []

    async def LoadAdapter(self, req, timeout=None):
        self.calls.append(f"load {req.name}")
        self.names.add(req.name)
        return worker_pb2.WorkerAdapterReply(adapters=sorted(self.names), host_bytes=1 << 20)

    async def UnloadAdapter(self, req, timeout=None):
        self.calls.append(f"unload {req.name}")
        self.names.discard(req.name)
        return worker_pb2.WorkerAdapterReply(adapters=sorted(self.names))


async def until(cond, timeout: float = 30.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met"
        await asyncio.sleep(0.01)


def make_adapters(in_use: dict[str, int], worker: FakeWorker) -> tuple[BatcherAdapters, list]:
    beats: list[list[str]] = []
    ad: BatcherAdapters

    async def publish():
        beats.append(ad.advertised())
    ad = BatcherAdapters("w0", grpc.aio.insecure_channel("127.0.0.1:1"), lambda n: in_use.get(n, 0), publish)
    ad._stub = worker
    ad.reset(worker.names)
    return ad, beats


def test_unload_refuses_new_requests_at_once_and_waits_for_accepted_ones():
    async def main():
        in_use = {"sql": 2}
        worker = FakeWorker(["sql"])
        ad, beats = make_adapters(in_use, worker)
        ad.check("sql")
        task = asyncio.ensure_future(ad.unload("sql", drain_s=30.0))
        await until(lambda: beats)                # the unload began: a heartbeat without it went out
        with pytest.raises(UnknownAdapterError, match="being unloaded"):
            ad.check("sql")                       # new requests: NOT_FOUND
        assert beats[0] == [] and not task.done() and worker.calls == []   # accepted ones still run
        in_use["sql"] = 0
        ad.requests_changed()                     # the batcher says so when a request leaves
        out = await task
        assert out.ok and worker.calls == ["unload sql"] and ad.advertised() == []
        out = await ad.unload("sql", drain_s=1.0)
        assert not out.ok and out.code == "NOT_FOUND"
        # A load after the unload serves it again and announces it in a heartbeat before answering.
        out = await ad.load("sql", "/a/sql", 5.0)
        assert out.ok and out.host_bytes == 1 << 20 and beats[-1] == ["sql"]
    asyncio.run(main())


def test_unload_timeout_answers_but_still_unloads_when_requests_finish():
    async def main():
        in_use = {"sql": 1}
        worker = FakeWorker(["sql"])
        ad, _ = make_adapters(in_use, worker)
        out = await ad.unload("sql", drain_s=0.1)
        assert not out.ok and out.code == "DEADLINE_EXCEEDED" and "1 accepted" in out.error
        in_use["sql"] = 0
        ad.requests_changed()
        await until(lambda: worker.calls)
        assert worker.calls == ["unload sql"] and ad.advertised() == []
    asyncio.run(main())


# ---- the router side with a fake NATS connection ------------------------------------------------
class FakeNats:
    """nc.request on sy.ctl.<worker>: answers with `answer(worker, ModelControl)`, after `gate` opens."""

    def __init__(self, answer=None):
        self.sent: list[tuple[str, bus_pb2.ModelControl]] = []
        self.answer = answer or (lambda w, ctl: bus_pb2.ModelControlReply(ok=True, adapters=[ctl.adapter]))
        self.gate = asyncio.Event()
        self.gate.set()

    async def request(self, subject, data, timeout):
        ctl = bus_pb2.ModelControl.FromString(data)
        wid = subject.rsplit(".", 1)[-1]
        self.sent.append((wid, ctl))
        await self.gate.wait()
        return types.SimpleNamespace(data=self.answer(wid, ctl).SerializeToString())


class FakeContext:
    def __init__(self, token="t"):
        self.md = (("authorization", f"Bearer {token}"),) if token else ()

    def invocation_metadata(self):
        return self.md

    def time_remaining(self):
        return None


def fake_router(nc: FakeNats, heartbeats=()):
    from common.config import StackConfig
    from router.adapter_control import AdapterControl
    from router.adapter_registry import AdapterRegistry
    from router.routing import WorkerTable
    r = types.SimpleNamespace(cfg=StackConfig(model="m", admin_tokens=["t"]), nc=nc, table=WorkerTable(),
                              adapters=AdapterRegistry(), pool_routing=None)
    r.known_models = lambda: sorted({"m", *(w.model for w in r.table.workers.values())})
    for h in heartbeats:
        r.table.observe(h)
    return r, AdapterControl(r)


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


def test_reconcile_pushes_once_per_worker_while_in_flight_and_holds_after():
    async def main():
        nc = FakeNats()
        nc.gate.clear()
        router, ctl = fake_router(nc, [hb("w0", "m"), hb("w1", "m", ["sql"]), hb("w2", "other")])
        router.adapters.add(SQL)
        ctl.reconcile()
        ctl.reconcile()                 # the push to w0 is still in flight: not sent again
        await settle()
        assert [(w, c.action, c.adapter, c.path) for w, c in nc.sent] == [("w0", "load_adapter", "sql", "/a/sql")]
        nc.gate.set()
        await settle()
        ctl.reconcile()                 # pushed; its heartbeat has not shown it yet: held, not re-pushed
        await settle()
        assert len(nc.sent) == 1
    asyncio.run(main())


def test_a_request_for_a_registered_adapter_waits_until_a_worker_advertises_it():
    async def main():
        router, ctl = fake_router(FakeNats(), [hb("w0", "m")])
        router.adapters.add(SQL)
        waiting = asyncio.ensure_future(ctl.wait_served("m", "sql", FakeContext()))
        await asyncio.sleep(0.12)
        assert not waiting.done()
        router.table.observe(hb("w0", "m", ["sql"]))
        await asyncio.wait_for(waiting, 30.0)
        # not registered: answered at once, not after the 10 s a registered adapter may wait
        await asyncio.wait_for(ctl.wait_served("m", "unknown", FakeContext()), 5.0)
        req = ctl.resolve_model(inference_pb2.GenerateRequest(model="sql", prompt="x"))
        assert (req.model, req.adapter_id) == ("m", "sql")
    asyncio.run(main())


def test_admin_load_registers_on_success_and_refuses_an_invalid_adapter():
    async def main():
        bad = FakeNats(lambda w, c: bus_pb2.ModelControlReply(ok=False, code="INVALID_ARGUMENT",
                                                              error="adapter 'x': rank r=32 exceeds max_lora_rank=16"))
        router, ctl = fake_router(bad, [hb("w0", "m"), hb("w1", "m")])
        with pytest.raises(RequestError) as e:
            await ctl.load(inference_pb2.LoadAdapterRequest(name="x", path="/p"), FakeContext())
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "max_lora_rank" in e.value.message
        assert "x" not in router.adapters
        with pytest.raises(RequestError) as e:
            await ctl.load(inference_pb2.LoadAdapterRequest(name="x", path="/p"), FakeContext(token=""))
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(RequestError) as e:
            await ctl.load(inference_pb2.LoadAdapterRequest(name="x", path="/p", base_model="nope"), FakeContext())
        assert e.value.code == grpc.StatusCode.NOT_FOUND and "nope" in e.value.message

        router, ctl = fake_router(FakeNats(), [hb("w0", "m"), hb("w1", "m"), hb("w2", "other")])
        resp = await ctl.load(inference_pb2.LoadAdapterRequest(name="x", path="/p", capabilities=["sql"]),
                              FakeContext())
        assert list(resp.workers) == ["w0", "w1"] and router.adapters.get("x").origin == "admin"
        assert router.adapters.get("x").capabilities == ["sql"]
        with pytest.raises(RequestError) as e:
            await ctl.load(inference_pb2.LoadAdapterRequest(name="x", path="/elsewhere"), FakeContext())
        assert e.value.code == grpc.StatusCode.ALREADY_EXISTS
    asyncio.run(main())


def test_admin_unload_removes_from_the_registry_and_asks_every_advertising_worker():
    async def main():
        nc = FakeNats()
        router, ctl = fake_router(nc, [hb("w0", "m", ["sql"]), hb("w1", "m")])
        router.adapters.add(SQL)
        resp = await ctl.unload(inference_pb2.UnloadAdapterRequest(name="sql"), FakeContext())
        assert "sql" not in router.adapters and list(resp.workers) == ["w0"]
        assert [(w, c.action) for w, c in nc.sent] == [("w0", "unload_adapter")]
        router.table.observe(hb("w0", "m"))
        with pytest.raises(RequestError) as e:
            await ctl.unload(inference_pb2.UnloadAdapterRequest(name="sql"), FakeContext())
        assert e.value.code == grpc.StatusCode.NOT_FOUND
    asyncio.run(main())
