from protos.switchyard.v1 import bus_pb2
from router.routing import Candidate, WorkerTable, choose, cost


def test_cost_is_overlap_weighted_uncached_blocks_plus_load():
    assert cost(Candidate("a", matched_blocks=3, load=2), prompt_blocks=10) == 7 + 2
    assert cost(Candidate("a", matched_blocks=3, load=2), 10, overlap_weight=2.0, load_weight=0.5) == 14 + 1
    assert cost(Candidate("a", matched_blocks=12, load=0), 10) == 0   # never negative


def test_choose_prefers_prefix_holder_until_its_load_outweighs_it():
    holder, other = Candidate("w0", matched_blocks=8, load=3), Candidate("w1", matched_blocks=0, load=0)
    assert choose([holder, other], prompt_blocks=10).worker_id == "w0"     # 2+3 < 10
    holder.load = 11
    assert choose([holder, other], prompt_blocks=10).worker_id == "w1"     # 2+11 > 10


def test_ties_go_to_lower_load_then_id():
    assert choose([Candidate("w1"), Candidate("w0")], 0).worker_id == "w0"


def _hb(wid, healthy=True, draining=False, running=0, waiting=0, model="m"):
    return bus_pb2.Heartbeat(worker_id=wid, model=model, healthy=healthy, draining=draining,
                             num_running=running, num_waiting=waiting)


def test_table_drops_silent_workers_and_skips_unhealthy():
    t = WorkerTable(timeout_s=3.0)
    t.observe(_hb("w0"), now=100.0)
    t.observe(_hb("w1", healthy=False), now=100.0)
    t.observe(_hb("w2", draining=True), now=100.0)
    t.observe(_hb("w3", model="other"), now=100.0)
    assert [w.worker_id for w in t.routable("m")] == ["w0"]
    assert t.expire(now=102.9) == []
    t.observe(_hb("w1"), now=102.0)
    assert sorted(t.expire(now=103.5)) == ["w0", "w2", "w3"]
    assert [w.worker_id for w in t.routable("m")] == ["w1"]


def test_load_counts_router_in_flight_when_heartbeat_is_stale():
    t = WorkerTable()
    t.observe(_hb("w0", running=1, waiting=1), now=0.0)
    t.workers["w0"].in_flight = 5
    assert t.candidates("m", {"w0": 4})[0] == Candidate("w0", 4, 5)
