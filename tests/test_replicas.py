"""common/replicas.py: the one live table of replicas fed by heartbeats (expiry, load, models, adapters,
activity, status lines), and the router, KV index and pool each keeping theirs in it."""
from __future__ import annotations

import asyncio

from common.replicas import ReplicaTable
from protos.switchyard.v1 import bus_pb2


def hb(wid, model="m", healthy=True, draining=False, running=0, waiting=0, adapters=(), generated=0, **kw):
    return bus_pb2.Heartbeat(worker_id=wid, model=model, healthy=healthy, draining=draining, num_running=running,
                             num_waiting=waiting, adapters=list(adapters), generation_tokens_total=generated, **kw)


def test_a_replica_silent_past_the_timeout_is_dropped_and_a_heartbeat_keeps_it():
    t = ReplicaTable(timeout_s=3.0)
    t.observe(hb("w0"), now=100.0)
    t.observe(hb("w1"), now=100.0)
    t.observe(hb("w1"), now=102.0)
    assert t.expire(now=103.0) == [] and len(t) == 2   # exactly the timeout: still there
    assert t.expire(now=103.5) == ["w0"]
    assert "w0" not in t and "w1" in t and t.get("w1").last_seen == 102.0
    assert t.expire(now=105.5) == ["w1"] and len(t) == 0


def test_the_view_is_one_object_updated_in_place():
    t = ReplicaTable()
    v = t.observe(hb("w0", running=1), now=1.0)
    v.in_flight = 4   # the reader's own count survives its heartbeats
    assert t.observe(hb("w0", running=2), now=2.0) is v
    assert (v.heartbeat.num_running, v.last_seen, v.in_flight) == (2, 2.0, 4)


def test_health_models_and_load():
    t = ReplicaTable()
    t.observe(hb("a", running=1, waiting=2))
    t.observe(hb("b", draining=True, running=5))
    t.observe(hb("c", healthy=False))
    t.observe(hb("d", model="other"))
    assert [w.worker_id for w in t.routable("m")] == ["a"]
    assert sorted(w.worker_id for w in t.live("m")) == ["a", "b"]          # draining still finishes its work
    assert sorted(w.worker_id for w in t.live()) == ["a", "b", "d"]
    assert {m: [w.worker_id for w in ws] for m, ws in t.models().items()} == {"m": ["a"], "other": ["d"]}
    a = t.get("a")
    assert (a.reported_load, a.load) == (3, 3)
    a.in_flight = 7
    assert a.load == 7   # the reader's in-flight count wins while heartbeats lag behind a burst


def test_adapters_are_read_from_heartbeats():
    t = ReplicaTable()
    t.observe(hb("a", adapters=["sql"]))
    t.observe(hb("b", adapters=["sql", "chat"], draining=True))
    t.observe(hb("c", model="other", adapters=["poem"]))
    assert t.adapters() == {"sql", "poem"}                          # routable replicas only
    assert [w.worker_id for w in t.with_adapter("sql")] == ["a"]
    assert sorted(w.worker_id for w in t.with_adapter("sql", routable=False)) == ["a", "b"]
    assert t.with_adapter("poem", model="m") == [] and t.get("c").serves("poem")
    assert t.get("b").adapters == ("sql", "chat")


def test_activity_is_work_in_the_heartbeat_or_tokens_generated_since_the_last():
    t = ReplicaTable()
    v = t.observe(hb("w", generated=100), now=1.0)
    assert not v.active and v.last_active is None          # a first heartbeat: only its queue counts
    assert t.observe(hb("w", generated=100), now=2.0).active is False
    assert t.observe(hb("w", generated=130), now=3.0).active and v.last_active == 3.0
    assert not t.observe(hb("w", generated=130), now=4.0).active and v.last_active == 3.0
    assert t.observe(hb("w", generated=130, waiting=1), now=5.0).active and v.last_active == 5.0
    assert t.observe(hb("x", running=1), now=6.0).active


def test_status_lines_by_worker_id():
    t = ReplicaTable()
    t.observe(hb("w1", running=2, kv_usage=0.5, block_size=16), now=10.0)
    t.observe(hb("w0"), now=9.0)
    t.get("w1").in_flight = 3
    lines = t.status({"w1": 42}, now=10.5)
    assert [s.worker_id for s in lines] == ["w0", "w1"]
    w1 = lines[1]
    assert (w1.num_running, w1.kv_usage, w1.block_size, w1.indexed_blocks, w1.router_in_flight) == (2, 0.5, 16, 42, 3)
    assert abs(w1.last_seen_ms_ago - 500.0) < 1e-6 and lines[0].indexed_blocks == 0


def test_changed_fires_on_heartbeats_expiry_and_removal():
    async def main():
        t = ReplicaTable(timeout_s=1.0)
        waiter = asyncio.create_task(t.changed.wait_for(lambda: bool(t.routable("m")), 5.0))
        await asyncio.sleep(0)
        t.observe(hb("w0", healthy=False))
        await asyncio.sleep(0)
        assert not waiter.done()
        t.observe(hb("w0"))
        assert await waiter is True
        for change in (lambda: t.expire(now=t.get("w0").last_seen + 2.0), lambda: t.remove("w1")):
            t.observe(hb("w1"))
            fired = asyncio.create_task(t.changed.wait(5.0))
            await asyncio.sleep(0)
            change()
            assert await fired is True
        assert len(t) == 0 and t.remove("nobody") is None
    asyncio.run(main())


def test_the_sweep_expires_on_its_interval_and_ends_on_stop():
    async def main():
        t = ReplicaTable(timeout_s=0.05)
        t.observe(hb("w0"))
        gone, ticks = [], []
        stop = asyncio.Event()
        sweep = asyncio.create_task(t.expire_every(0.02, stop, on_expired=gone.append,
                                                   on_tick=lambda: ticks.append(1)))
        await t.changed.wait_for(lambda: "w0" not in t, 2.0)
        assert gone == ["w0"] and ticks
        stop.set()
        await asyncio.wait_for(sweep, 1.0)
    asyncio.run(main())


def test_router_kv_index_and_pool_keep_their_replicas_in_the_one_table(tmp_path):
    from common.catalog import parse_catalog
    from common.config import StackConfig
    from kv_manager.events import STORED, KvEvent
    from kv_manager.service import KvIndexService
    from router.routing import WorkerTable
    from services.pool import ModelEntry, PoolManager, Replica

    assert issubclass(WorkerTable, ReplicaTable)
    kv = KvIndexService(worker_timeout_s=2.0)
    assert isinstance(kv.table, ReplicaTable) and kv.table.timeout_s == 2.0
    kv.table.observe(hb("w0"), now=0.0)
    kv.index.apply("w0", KvEvent(STORED, [1, 2]))
    assert [s.worker_id for s in kv.live_workers("m")] == ["w0"] and kv.status().workers[0].indexed_blocks == 2
    assert kv.reap(now=5.0) == ["w0"] and kv.index.num_blocks("w0") == 0   # its blocks leave with it

    cat = parse_catalog({"models": [{"name": "m", "source": "random:tiny"}]})
    pool = PoolManager(StackConfig(worker_timeout_s=4.0), cat, tmp_path, tmp_path / "logs")
    assert isinstance(pool.table, ReplicaTable) and pool.table.timeout_s == 4.0

    # A replica's heartbeat goes into the pool's table: health, queue depth and the model's last use.
    pool.models["m"] = entry = ModelEntry(cat.models[0], "v1", "random:tiny")
    r = pool.replicas["w"] = Replica("w", "m", "v1", "m@v1", 0, 0.5, 0, worker=None, batcher=None)
    assert r.hb is None and r.queue_depth == 0
    msg = type("Msg", (), {})()
    before = entry.last_used
    for h in (hb("w", model="m@v1", generated=10), hb("other", model="x")):
        msg.data = h.SerializeToString()
        asyncio.run(pool._on_heartbeat(msg))
    assert "other" not in pool.table and r.view is pool.table.get("w") and r.hb.model == "m@v1"
    assert entry.last_used == before   # a first heartbeat with nothing queued is no use
    msg.data = hb("w", model="m@v1", running=1, waiting=2, generated=10).SerializeToString()
    asyncio.run(pool._on_heartbeat(msg))
    assert r.queue_depth == 3 and entry.last_used == r.hb_at >= before
