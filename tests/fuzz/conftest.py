"""One real stack for the fuzz tests (router + Triton front door), and how many examples each RPC gets.

`SWITCHYARD_FUZZ_EXAMPLES` (default 12) is the number of generated messages per RPC: small enough that
the fuzz tests add about a minute to `make test` on a 2-core box; `make fuzz` runs 10,000 (about 45
minutes here: 5-25 ms a message, the stack shared by every test). `SWITCHYARD_FUZZ_REPORT=<path>`
writes what each RPC got (status counts, seconds, failures) as JSON at the end of the session.
"""
from __future__ import annotations

import json
import os
import time

import pytest

from tests.e2e.conftest import pid_alive, start_stack

ADMIN_TOKEN = "fuzz-admin"   # the Admin RPCs get it (mostly), so the fuzzing reaches past the token check
EXAMPLES = int(os.environ.get("SWITCHYARD_FUZZ_EXAMPLES", "12"))


@pytest.fixture(scope="session")
def fuzz_stack(tmp_path_factory):
    """One worker, and the Triton front door on a free port. At the end: every process of it is still
    alive (none crashed, none was restarted) and the stop leaves nothing behind."""
    from common.ports import free_port
    h = start_stack(tmp_path_factory.mktemp("fuzz-stack"), workers=1, triton_port=free_port("127.0.0.1"),
                    admin_tokens=[ADMIN_TOKEN])
    pids = h.all_pids()
    yield h
    dead = [p for p in pids if not pid_alive(p)]
    leftovers = h.stop()
    assert not dead, f"stack processes died during the fuzzing: {dead}\n{h.logs()}"
    assert not leftovers, f"processes outlived the stack stop: {leftovers}"


_OUTCOMES: dict[str, dict] = {}


def pytest_runtest_logreport(report):
    if report.when == "call" or report.failed:
        o = _OUTCOMES.setdefault(report.nodeid, {"outcome": "passed", "seconds": 0.0})
        o["seconds"] += report.duration
        if report.failed:
            o["outcome"] = f"failed ({report.when})"
            o["failure"] = str(report.longrepr)[-2000:]


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("SWITCHYARD_FUZZ_REPORT")
    if not path:
        return
    from tests.fuzz.wire import REPORT
    rpcs = {name: {**r, "calls": sum(r["statuses"].values()), **_OUTCOMES.get(r["test"], {})}
            for name, r in REPORT.items()}
    other = {k: v for k, v in _OUTCOMES.items() if k not in {r["test"] for r in REPORT.values()}}
    with open(path, "w") as f:
        json.dump({"examples_per_rpc": EXAMPLES, "exit_status": int(exitstatus), "finished_unix": time.time(),
                   "loadavg_end": list(os.getloadavg()), "rpcs": rpcs, "other_tests": other}, f, indent=1)
