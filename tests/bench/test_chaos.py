"""`switchyard bench chaos` end to end with its two cheapest faults: SIGKILL of the kv_manager and a
handful of mid-stream cancels, under steady load on a one-worker stack it starts through the launcher.

The report has its shape (machine with the load average, per fault the figures, RSS per process) and
its counts agree with each other; a lost or hung stream, a failed stream or a kv_manager the launcher
did not bring back fails the test.
"""
from __future__ import annotations

import json

from bench.chaos import Stream, window_summary
from services.cli import main as cli


def test_window_summary_sorts_each_stream_by_how_it_ended():
    recs = [Stream(0.0, end=1.0, final=True),                       # completed before the fault
            Stream(1.0, end=3.0, final=True),                       # completed across it
            Stream(1.5, end=2.5, error="UNAVAILABLE"),              # failed, with a status
            Stream(2.0, end=2.2),                                   # ended: no final chunk, no error
            Stream(2.1),                                            # never ended
            Stream(2.3, end=4.0, error="HUNG_CANCELLED"),           # the bench gave up on it
            Stream(2.4, end=2.6, error="STOPPED"),                  # the run ended: not counted
            Stream(9.0, end=9.5, final=True)]                       # after the window
    s = window_summary(recs, 2.0, 5.0)
    assert s == {"streams": 5, "completed": 1, "failed": {"UNAVAILABLE": 1}, "failed_total": 1,
                 "lost_silently": 1, "hung": 2}


def test_bench_chaos_kv_manager_kill_and_cancels(tmp_path):
    out = tmp_path / "chaos.json"
    rc = cli(["bench", "chaos", "--faults", "kill_kv_manager,cancels", "--workers", "1", "--streams", "2",
              "--max-tokens", "6", "--cancels", "12", "--hang-s", "90", "--settle-s", "1",
              "--num-kv-blocks", "256", "--max-model-len", "512", "--json", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["machine"]["loadavg_1_5_15"] is not None and len(rep["machine"]["loadavg_1_5_15"]) == 3
    assert set(rep["rss_start_bytes"]) >= {"nats", "kv_manager", "router", "worker-w0", "batcher-w0"}
    assert all(v and v > 0 for v in rep["rss_start_bytes"].values()), rep["rss_start_bytes"]
    assert [f["fault"] for f in rep["faults"]] == ["kill_kv_manager", "cancels"]
    kill, cancels = rep["faults"]
    for f in rep["faults"]:
        # every stream of the load that was open during the fault is accounted for exactly once
        assert f["streams"] == f["completed"] + f["failed_total"] + f["lost_silently"] + f["hung"], f
        assert f["failed_total"] == sum(f["failed"].values())
        assert f["lost_silently"] == 0 and f["hung"] == 0, f
        assert f["recover_s"] is not None and f["recover_s"] >= 0, f
    # the launcher noticed the dead kv_manager and brought it back; the load never saw it
    assert kill["victim"] == "kv_manager" and kill["detect_s"] is not None and kill["detect_s"] <= kill["recover_s"]
    assert kill["failed_total"] == 0, kill
    assert cancels["detect_s"] is None
    outcome = cancels["request"]["outcome"]
    assert sum(outcome.values()) == 12 and outcome.get("cancelled", 0) >= 10, outcome
    assert cancels["request"]["blocks_returned"], cancels["request"]
    assert all(f["fault_requests_lost_silently"] == 0 for f in rep["faults"])
    assert rep["totals"] == {"lost_silently": 0, "hung": 0, "failed_total": 0}
    assert rep["leftover_pids"] == [], "processes outlived the stack stop"
    load = rep["load"]
    assert load["completed"] > 0 and load["lost_silently"] == 0 and load["hung"] == 0, load
