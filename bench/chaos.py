"""`switchyard bench chaos`: faults under steady load, and how the stack takes each one.

It starts a stack the way an operator does (`switchyard up` as a child process, so the launcher
supervises and restarts), keeps `--streams` greedy streams running against the router, and injects
each fault in turn: SIGKILL of a worker, a batcher, the kv_manager, the router or nats-server;
SIGSTOP of a worker or a batcher for `--stop-s` seconds; a 60 MB prompt; a 10x burst; many mid-stream
cancels; slow readers. Per fault it prints and writes (`--json`):

* detect_s: fault -> the stack shows it (stack.json: the unit restarting or its pid changed; Admin/Status:
  a worker unhealthy or gone). null for faults that are requests, not process failures.
* recover_s: fault -> full capacity again: every unit up, every worker healthy and a probe request served.
* failed: streams of the steady load that ended with an error, by status code.
* migrated: the router's `switchyard_router_migrations_total` over the fault (0 where it does not exist).
* lost_silently: a stream that ended without a final chunk and without an error.
* hung: a stream still open `--hang-s` (30) seconds after the fault (then cancelled by the bench).

`--soak MINUTES`: moderate load for that long and the RSS of every process of the stack every
`--sample-s` (30) seconds: per process the growth from the start, the growth after a warm-up (the
first 10% of the run, at least 2 minutes) and a least-squares slope per hour after it, so a heap that
settles is told apart from a leak; with JetStream's own usage beside nats-server's RSS. The load
average before the run is in the JSON (`machine`), and at each sample.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import machine_info, write_json
from bench.metrics import percentile

REPO = Path(__file__).resolve().parents[1]
FAULTS = ("kill_worker", "kill_batcher", "kill_kv_manager", "kill_router", "kill_nats", "stop_worker",
          "stop_batcher", "huge_prompt", "burst", "cancels", "slow_readers")
PROCESS_FAULTS = {  # fault -> (signal, supervised unit, member of it); w<last> is the victim pair
    "kill_worker": (signal.SIGKILL, "w", "worker"), "kill_batcher": (signal.SIGKILL, "w", "batcher"),
    "kill_kv_manager": (signal.SIGKILL, "kv_manager", "kv_manager"),
    "kill_router": (signal.SIGKILL, "router", "router"), "kill_nats": (signal.SIGKILL, "nats", "nats"),
    "stop_worker": (signal.SIGSTOP, "w", "worker"), "stop_batcher": (signal.SIGSTOP, "w", "batcher"),
}
PROMPTS = ["The capital of France is", "def quicksort(arr):", "Once upon a time, in a quiet village,",
           "The three laws of thermodynamics are", "A haiku about autumn:", "SELECT name FROM users WHERE"]
MIGRATIONS = "switchyard_router_migrations_total"


# ---- the stack, as `switchyard up` runs it ---------------------------------------------------------
class UpStack:
    """`switchyard up --config --workdir` as a child process; its stack.json says pids and units."""

    def __init__(self, workdir: Path, config: dict):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        cfg_path = workdir / "chaos-config.json"
        cfg_path.write_text(json.dumps(config))
        self.out = open(workdir / "launcher.out", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--config", str(cfg_path),
                                      "--workdir", str(workdir)], cwd=REPO, stdout=self.out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.router = ""

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not (self.workdir / "stack.json").exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"switchyard up exited {self.proc.returncode}; see {self.workdir}/launcher.out")
            if time.monotonic() > deadline:
                raise TimeoutError(f"stack not ready after {timeout:.0f}s; see {self.workdir}")
            time.sleep(0.2)
        self.router = self.state()["router"]

    def state(self) -> dict:
        for _ in range(20):   # the launcher rewrites it: a half-written file reads again
            try:
                return json.loads((self.workdir / "stack.json").read_text())
            except (OSError, ValueError):
                time.sleep(0.05)
        return {}

    def pids(self) -> dict[str, int]:
        """Child name -> pid, as the launcher last wrote them (restarts change them)."""
        return {c: p for u in self.state().get("services", {}).values() for c, p in u.get("pids", {}).items()}

    def stop(self, timeout: float = 60.0) -> list[int]:
        """SIGTERM the launcher; SIGKILL anything of ours left. Returns the pids that had to be killed."""
        pids = list(self.pids().values())
        for p in pids:   # a stopped process would hold the drain up
            _signal(p, signal.SIGCONT)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        left = [p for p in [self.proc.pid, *pids] if _alive(p)]
        for p in left:
            _signal(p, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(5)
        self.out.close()
        return left


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def scrape_counter(addr: str, name: str) -> float | None:
    """The sum over labels of a Prometheus counter on http://addr/metrics; None when unreachable."""
    try:
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=2.0) as r:
            text = r.read().decode()
    except OSError:
        return None
    total, seen = 0.0, False   # not exported at all (an older router): None, not 0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith(f"{name}_created"):
            rest = line[len(name):]
            if rest[:1] in ("{", " "):
                total += float(line.rsplit(" ", 1)[1])
                seen = True
    return total if seen else None


# ---- steady load ------------------------------------------------------------------------------------
@dataclass
class Stream:
    start: float
    end: float | None = None
    chunks: int = 0
    final: bool = False
    error: str | None = None      # status code name
    lane: int = 0

    @property
    def lost_silently(self) -> bool:
        return self.end is not None and not self.final and self.error is None


@dataclass
class Load:
    """`streams` lanes, each sending one greedy request after another (a short pause after an error)."""
    router: str
    model: str
    streams: int
    max_tokens: int
    records: list[Stream] = field(default_factory=list)
    tasks: dict[int, asyncio.Task] = field(default_factory=dict)
    _stop: bool = False

    async def _lane(self, stub, lane: int) -> None:
        import grpc

        from protos.switchyard.v1 import common_pb2, inference_pb2
        n = 0
        while not self._stop:
            n += 1
            req = inference_pb2.GenerateRequest(
                model=self.model, prompt=f"{PROMPTS[(lane + n) % len(PROMPTS)]} ({lane}.{n})",
                sampling=common_pb2.SamplingParams(max_tokens=self.max_tokens, temperature=0.0, ignore_eos=True))
            s = Stream(time.monotonic(), lane=lane)
            self.records.append(s)
            try:
                async for r in stub.Generate(req):
                    s.chunks += 1
                    if r.finish_reason:
                        s.final = True
            except grpc.aio.AioRpcError as e:
                s.error = e.code().name
            except asyncio.CancelledError:   # the bench gave up on it (hung) or the run is over
                s.error = "STOPPED" if self._stop else "HUNG_CANCELLED"
                s.end = time.monotonic()
                raise
            s.end = time.monotonic()
            if s.error:   # no capacity: retry, but do not spin on a 2-core box
                await asyncio.sleep(0.5)

    def start(self, ch) -> None:
        from protos.switchyard.v1 import inference_pb2_grpc
        stub = inference_pb2_grpc.InferenceStub(ch)
        for lane in range(self.streams):
            self.tasks[lane] = asyncio.create_task(self._lane(stub, lane), name=f"chaos-lane-{lane}")
        self._stub = stub

    def restart_lane(self, lane: int) -> None:
        """A hung lane was cancelled: start it again so the load stays steady."""
        self.tasks[lane] = asyncio.create_task(self._lane(self._stub, lane), name=f"chaos-lane-{lane}")

    async def stop(self) -> None:
        self._stop = True
        for t in self.tasks.values():
            t.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)


def window_summary(records: list[Stream], t0: float, t1: float) -> dict:
    """The load's streams that were open at some time in [t0, t1]: how each ended."""
    touched = [s for s in records if s.start <= t1 and (s.end is None or s.end >= t0) and s.error != "STOPPED"]
    failed: dict[str, int] = {}
    for s in touched:
        if s.error and s.error not in ("HUNG_CANCELLED", "STOPPED"):
            failed[s.error] = failed.get(s.error, 0) + 1
    return {"streams": len(touched), "completed": sum(1 for s in touched if s.final),
            "failed": failed, "failed_total": sum(failed.values()),
            "lost_silently": sum(1 for s in touched if s.lost_silently),
            "hung": sum(1 for s in touched if s.end is None or s.error == "HUNG_CANCELLED")}


# ---- probes -----------------------------------------------------------------------------------------
def _gen(model: str, prompt: str, max_tokens: int):
    from protos.switchyard.v1 import common_pb2, inference_pb2
    return inference_pb2.GenerateRequest(model=model, prompt=prompt, sampling=common_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=0.0))


async def probe(stub, model: str, timeout: float = 10.0) -> bool:
    import grpc
    try:
        async for r in stub.Generate(_gen(model, "Hello", 2), timeout=timeout):
            if r.finish_reason:
                return True
    except grpc.aio.AioRpcError:
        return False
    return False


def workers_status(router: str, timeout: float = 2.0) -> dict[str, dict]:
    """Admin/Status: worker id -> its status as a dict (grpc.RpcError when the router does not answer)."""
    from common.rpc import message_dict, sync_channel
    from protos.switchyard.v1 import inference_pb2_grpc, kv_index_pb2
    with sync_channel(router) as ch:
        st = inference_pb2_grpc.AdminStub(ch).Status(kv_index_pb2.StatusRequest(), timeout=timeout)
    return {w["worker_id"]: w for w in message_dict(st)["workers"]}


def healthy_workers(router: str, ids: set[str]) -> int | None:
    """How many of the generation workers `ids` (w0, w1, ...; not an embedding worker) are healthy."""
    import grpc
    try:
        return sum(1 for k, w in workers_status(router).items() if k in ids and w.get("healthy"))
    except grpc.RpcError:
        return None


class Chaos:
    def __init__(self, args, up: UpStack):
        self.args, self.up = args, up
        self.workers = args.workers

    def victim_pair(self) -> str:
        return f"w{self.workers - 1}"

    def units_up(self, st: dict) -> bool:
        return all(u.get("state") == "up" for u in st.get("services", {}).values())

    async def full_capacity(self, stub) -> bool:
        st = await asyncio.to_thread(self.up.state)
        if not self.units_up(st):
            return False
        n = await asyncio.to_thread(healthy_workers, self.up.router, {f"w{i}" for i in range(self.workers)})
        return n is not None and n >= self.workers and await probe(stub, self.args.model)

    async def wait_capacity(self, stub, since: float, timeout: float) -> float | None:
        while time.monotonic() - since < timeout:
            if await self.full_capacity(stub):
                return time.monotonic() - since
            await asyncio.sleep(0.2)
        return None

    def migrations(self) -> float | None:
        addr = self.up.state().get("metrics", {}).get("router")
        return scrape_counter(addr, MIGRATIONS) if addr else None

    def inject_process(self, name: str) -> tuple[float, dict]:
        """Signal the victim; returns (t0, what is needed to tell when it is detected)."""
        sig, unit, member = PROCESS_FAULTS[name]
        unit = self.victim_pair() if unit == "w" else unit
        st = self.up.state()
        svc = st["services"][unit]
        child = member if member in svc["pids"] else f"{member}-{unit}"
        pid = svc["pids"][child]
        before = {"unit": unit, "child": child, "pid": pid, "restarts": svc.get("restarts", 0)}
        t0 = time.monotonic()
        _signal(pid, sig)
        return t0, before

    def detected(self, before: dict) -> bool:
        st = self.up.state()
        svc = st.get("services", {}).get(before["unit"], {})
        if svc.get("state") != "up" or svc.get("restarts", 0) != before["restarts"] \
                or svc.get("pids", {}).get(before["child"]) != before["pid"]:
            return True
        if before["unit"].startswith("w"):   # a hung worker: the router's view says so
            import grpc
            try:
                ws = workers_status(self.up.router, timeout=1.0)
            except grpc.RpcError:   # the router itself is what failed: stack.json tells above
                return False
            w = ws.get(before["unit"])
            return w is None or not w.get("healthy")
        return False

    async def run_fault(self, name: str, load: Load, stub) -> dict:
        args = self.args
        m0 = await asyncio.to_thread(self.migrations)
        rec: dict = {"fault": name, "detect_s": None, "recover_s": None}
        t0 = time.monotonic()
        if name in PROCESS_FAULTS:
            t0, before = await asyncio.to_thread(self.inject_process, name)
            rec["victim"] = before["child"]
            resume_at = t0 + args.stop_s if PROCESS_FAULTS[name][0] == signal.SIGSTOP else None
            while time.monotonic() - t0 < args.hang_s:
                if await asyncio.to_thread(self.detected, before):
                    rec["detect_s"] = time.monotonic() - t0
                    break
                if resume_at and time.monotonic() >= resume_at:
                    break
                await asyncio.sleep(0.05)
            if resume_at:
                await asyncio.sleep(max(0.0, resume_at - time.monotonic()))
                _signal(before["pid"], signal.SIGCONT)
        elif name == "huge_prompt":
            rec["request"] = await self.huge_prompt(stub)
        elif name == "burst":
            rec["request"] = await self.burst(stub)
        elif name == "cancels":
            rec["request"] = await self.cancels(stub)
        readers = asyncio.create_task(self.slow_readers(stub)) if name == "slow_readers" else None
        rec["recover_s"] = await self.wait_capacity(stub, t0, args.recover_timeout_s)
        if readers is not None:   # capacity is measured while they read: a slow client must not hold others up
            rec["request"] = await readers
        # Streams open during the fault: wait until each ended or was open --hang-s (from the fault, or
        # from its own start when it began later) - then it is hung.
        t1 = time.monotonic()
        while any(s.end is None and s.start <= t1 and time.monotonic() < max(t0, s.start) + args.hang_s
                  for s in load.records):
            await asyncio.sleep(0.1)
        for lane, task in list(load.tasks.items()):   # still open: hung; cancel it and keep the load going
            open_ = [s for s in load.records if s.lane == lane and s.end is None and s.start <= t1]
            if open_:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                load.restart_lane(lane)
        rec.update(window_summary(load.records, t0, t1))
        # the fault's own requests (burst, slow readers, cancels) that ended without a final chunk or an error
        extra = rec.get("request", {})
        rec["fault_requests_lost_silently"] = (extra.get("ended", {}).get("lost_silently", 0)
                                               + extra.get("outcome", {}).get("lost_silently", 0))
        # the streams already running when the fault hit (what migration is for), apart from the retries after it
        rec["in_flight_at_fault"] = window_summary(load.records, t0, t0)
        m1 = await asyncio.to_thread(self.migrations)
        # a restarted router starts its counter at 0 again: then all it counted is from this fault
        rec["migrated"] = None if m1 is None else (m1 - (m0 or 0.0) if m1 >= (m0 or 0.0) else m1)
        return rec

    async def huge_prompt(self, stub) -> dict:
        import grpc
        t = time.monotonic()
        try:
            async for _ in stub.Generate(_gen(self.args.model, "a" * (self.args.huge_mb * 1024 * 1024), 2),
                                         timeout=60):
                pass
            code, msg = "OK", ""
        except grpc.aio.AioRpcError as e:
            code, msg = e.code().name, (e.details() or "")[:200]
        return {"bytes": self.args.huge_mb * 1024 * 1024, "code": code, "message": msg,
                "answered_s": time.monotonic() - t}

    async def burst(self, stub) -> dict:
        """`--burst-factor` times the steady streams at once, each with a `--burst-deadline-s` deadline:
        each must get a first token within it or a refusal within 100 ms (`goal_missed` counts those
        that did not). A refusal's retry-after-ms is set beside the time the queue ahead of it actually
        took: from the refusal until every request accepted before it had its first token and, when
        they outnumber the seats, enough of them had ended to free one for it. First the
        same burst, from the same client, against a server that refuses every call at once
        (bench/grpc_floor.py --refuse): the fastest refusal this machine's grpc.aio allows, side by side."""
        import grpc
        n = self.args.streams * self.args.burst_factor
        deadline_s = self.args.burst_deadline_s or self.args.hang_s
        floor = await self._refusal_floor(n, deadline_s)
        t0 = time.monotonic()

        async def one(i: int) -> dict:
            t = time.monotonic()
            rec = {"i": i, "start_s": round(t - t0, 4), "outcome": "no_tokens", "after_s": None, "ended": None,
                   "retry_after_ms": None}
            first: float | None = None
            try:
                async for r in stub.Generate(_gen(self.args.model, f"{PROMPTS[i % len(PROMPTS)]} burst {i}",
                                                  self.args.max_tokens), timeout=deadline_s):
                    if r.token_ids and first is None:
                        first = time.monotonic() - t
                    if r.finish_reason:
                        rec["ended"] = "completed"
                        break
                else:
                    rec["ended"] = "lost_silently"
            except grpc.aio.AioRpcError as e:
                rec["ended"] = e.code().name
                if first is None:
                    rec["outcome"] = e.code().name
                    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        rec["refused_by"] = _refused_by(e.details() or "")
                for k, v in (e.trailing_metadata() or ()):
                    if k == "retry-after-ms":
                        rec["retry_after_ms"] = int(v)
            if first is not None:
                rec["outcome"] = "first_token"
            rec["after_s"] = round(first if first is not None else time.monotonic() - t, 4)
            rec["end_s"] = round(time.monotonic() - t0, 4)
            return rec
        recs = await asyncio.gather(*(one(i) for i in range(n)))
        by: dict[str, list[float]] = {}
        for r in recs:
            by.setdefault(r["outcome"], []).append(r["after_s"])
        ended = [r["ended"] for r in recs]
        # The goal: a first token within the deadline, or a refusal within 100 ms.
        missed = [r for r in recs if r["outcome"] != "first_token" and r["after_s"] > 0.1]
        # When a refused request, had it waited, would have had its turn: the requests accepted before it
        # all got their first token, and (more of them than the seats the steady streams leave) enough
        # of them ended to free a seat for it.
        accepted = [(r["start_s"], r["start_s"] + r["after_s"], r["end_s"]) for r in recs
                    if r["outcome"] == "first_token"]
        seats = max(1, self._seats() - self.args.streams)   # the steady streams hold theirs throughout
        ratios = []
        for r in recs:
            if r["retry_after_ms"] is None or r["outcome"] != "RESOURCE_EXHAUSTED":
                continue
            at = r["start_s"] + r["after_s"]
            ahead = [(ft, end) for st, ft, end in accepted if st <= r["start_s"]]
            actual = None
            if ahead:
                turn = max(ft for ft, _ in ahead)
                if len(ahead) >= seats:
                    turn = max(turn, sorted(end for _, end in ahead)[len(ahead) - seats])
                actual = turn - at
            r["queue_actual_s"] = None if actual is None else round(actual, 4)
            if actual and actual > 0:
                ratios.append(r["retry_after_ms"] / 1000 / actual)
        within2 = sum(1 for x in ratios if 0.5 <= x <= 2.0)
        refusals = [r["after_s"] for r in recs if r["outcome"] == "RESOURCE_EXHAUSTED"]
        return {"requests": n, "deadline_s": deadline_s, "ended": {e: ended.count(e) for e in sorted(set(ended))},
                "refused_by": {k: sum(1 for r in recs if r.get("refused_by") == k)
                               for k in sorted({r["refused_by"] for r in recs if "refused_by" in r})},
                "refusal_s": _spread(refusals), "floor_refusal_s": floor,
                **{k: {"count": len(v), "max_s": max(v), "median_s": sorted(v)[len(v) // 2]} for k, v in by.items()},
                "goal_missed": len(missed), "goal_missed_outcomes": {k: sum(1 for r in missed if r["outcome"] == k)
                                                                     for k in sorted({r["outcome"] for r in missed})},
                "retry_after_vs_actual": {"refusals_compared": len(ratios), "within_2x": within2,
                                          "ratio_p10": percentile(ratios, 10), "ratio_p50": percentile(ratios, 50),
                                          "ratio_p90": percentile(ratios, 90)},
                "per_request": recs}

    def _seats(self) -> int:
        """Batch seats across the stack's replicas (engine max_num_seqs x workers)."""
        cfg = json.loads((self.up.workdir / "stack-config.json").read_text())
        return int(cfg["engine"]["max_num_seqs"]) * int(cfg["workers"])

    async def _refusal_floor(self, n: int, deadline_s: float) -> dict:
        """The burst's n calls at once against a server that refuses each at once: seconds to the refusal."""
        import grpc

        from bench.grpc_floor import floor_server
        from protos.switchyard.v1 import inference_pb2_grpc
        with tempfile.TemporaryDirectory(prefix="sy-floor-") as logs, floor_server(Path(logs), refuse=True) as addr:
            async with grpc.aio.insecure_channel(addr) as ch:
                floor_stub = inference_pb2_grpc.InferenceStub(ch)
                await ch.channel_ready()

                async def one(i: int) -> float:
                    t = time.monotonic()
                    try:
                        async for _ in floor_stub.Generate(_gen(self.args.model, f"floor {i}", 1), timeout=deadline_s):
                            pass
                    except grpc.aio.AioRpcError:
                        pass
                    return time.monotonic() - t
                return _spread(await asyncio.gather(*(one(i) for i in range(n))))

    async def cancels(self, stub) -> dict:
        """Requests cancelled mid-stream (after their first chunk), `--cancels` of them, 16 at a time;
        then the batchers' free blocks must come back and the router's in-flight count go to zero."""
        import grpc
        before = await asyncio.to_thread(workers_status, self.up.router)
        free0 = {k: w.get("num_free_blocks", 0) for k, w in before.items()}
        sem = asyncio.Semaphore(16)
        outcome: dict[str, int] = {}

        async def one(i: int) -> None:
            async with sem:
                call = stub.Generate(_gen(self.args.model, f"{PROMPTS[i % len(PROMPTS)]} cancel {i}", 64))
                kind = "lost_silently"   # stays so only if the stream ends with no chunk and no error
                try:
                    async for _ in call:
                        kind = "cancelled"
                        break
                except grpc.aio.AioRpcError as e:
                    kind = e.code().name
                call.cancel()
                outcome[kind] = outcome.get(kind, 0) + 1
        await asyncio.gather(*(one(i) for i in range(self.args.cancels)))
        deadline = time.monotonic() + self.args.hang_s
        free1: dict = {}
        returned = False
        while not returned and time.monotonic() < deadline:
            st = await asyncio.to_thread(workers_status, self.up.router)
            free1 = {k: w.get("num_free_blocks", 0) for k, w in st.items()}
            # the steady load holds a few blocks of its own (a heartbeat's view): allow it 4 per stream
            returned = all(free1.get(k, 0) >= v - self.args.streams * 4 for k, v in free0.items())
            if not returned:
                await asyncio.sleep(0.2)
        return {"requests": self.args.cancels, "outcome": outcome, "free_blocks_before": free0,
                "free_blocks_after": free1, "blocks_returned": returned}

    async def slow_readers(self, stub) -> dict:
        """A few streams whose client reads one chunk a second: they finish, the others are not held up."""
        import grpc
        n = max(1, self.args.streams // 2)

        async def one(i: int) -> str:
            try:
                async for r in stub.Generate(_gen(self.args.model, f"slow reader {i}", 16),
                                             timeout=self.args.hang_s + 60):
                    await asyncio.sleep(1.0)
                    if r.finish_reason:
                        return "completed"
                return "lost_silently"
            except grpc.aio.AioRpcError as e:
                return e.code().name
        outs = await asyncio.gather(*(one(i) for i in range(n)))
        return {"readers": n, "outcome": {k: outs.count(k) for k in set(outs)}}


def stack_rss(up: UpStack) -> dict[str, int | None]:
    pids = up.pids()
    return {name: rss_bytes(pid) for name, pid in sorted(pids.items())}


async def run_chaos(args, up: UpStack) -> dict:
    from common.rpc import channel
    from protos.switchyard.v1 import inference_pb2_grpc
    chaos = Chaos(args, up)
    out: dict = {"faults": []}
    async with channel(up.router) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        if not await chaos.wait_capacity(stub, time.monotonic(), args.recover_timeout_s):
            raise RuntimeError("the stack never reached full capacity before the first fault")
        load = Load(up.router, args.model, args.streams, args.max_tokens)
        load.start(ch)
        await asyncio.sleep(args.settle_s)
        try:
            for name in args.faults:
                rec = await chaos.run_fault(name, load, stub)
                out["faults"].append(rec)
                print_row(rec)
                await asyncio.sleep(args.settle_s)
            if args.soak:
                out["soak"] = await soak(args, up, load)
        finally:
            await load.stop()
        out["load"] = window_summary(load.records, 0.0, time.monotonic())
    return out


def rss_trend(series: list[tuple[float, int | None]], warmup_s: float) -> dict:
    """One process's RSS samples [(seconds since the start, bytes)]: growth from the first sample and
    from the first sample after the warm-up (a Go heap or an allocator arena settles in its first
    minutes), and the least-squares slope over the samples after the warm-up, per hour: a plateau has
    a slope near 0, a leak a steady one."""
    pts = [(t, b) for t, b in series if b]
    if len(pts) < 2:
        return {"samples": len(pts)}
    first, last = pts[0][1], pts[-1][1]
    after = [(t, b) for t, b in pts if t >= warmup_s] or pts[-1:]
    base = after[0][1]
    out = {"samples": len(pts), "start_bytes": first, "warm_bytes": base, "end_bytes": last,
           "min_bytes": min(b for _, b in pts), "max_bytes": max(b for _, b in pts),
           "growth_pct": 100.0 * (last - first) / first, "growth_after_warmup_pct": 100.0 * (last - base) / base,
           "slope_bytes_per_h": None, "slope_pct_per_h": None}
    if len(after) >= 3:
        n = len(after)
        mt = sum(t for t, _ in after) / n
        mb = sum(b for _, b in after) / n
        var = sum((t - mt) ** 2 for t, _ in after)
        if var > 0:
            slope_s = sum((t - mt) * (b - mb) for t, b in after) / var
            out["slope_bytes_per_h"] = slope_s * 3600.0
            out["slope_pct_per_h"] = 100.0 * slope_s * 3600.0 / base
    return out


async def jetstream_usage(nats_url: str) -> dict | None:
    """JetStream account usage (memory and file bytes, streams, consumers): nats-server's own state
    beside its RSS, to tell stored messages from heap. None when it cannot be read."""
    try:
        import nats
        nc = await nats.connect(nats_url, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False)
    except Exception:   # noqa: BLE001 (a best-effort sample: TLS stacks or a restarting server)
        return None
    try:
        info = await asyncio.wait_for(nc.jetstream().account_info(), 3.0)
        return {"memory": info.memory, "storage": info.storage, "streams": info.streams,
                "consumers": info.consumers}
    except Exception:   # noqa: BLE001
        return None
    finally:
        await nc.close()


async def soak(args, up: UpStack, load: Load) -> dict:
    """The steady load for --soak minutes; the RSS of every process of the stack every --sample-s
    seconds, and per process the growth from the start and from the end of the warm-up (the first 10%
    of the run, at least 2 minutes) with a least-squares slope per hour after it (a process the
    launcher restarted meanwhile is named in `restarted`: its series spans two processes)."""
    pids0 = await asyncio.to_thread(up.pids)
    nats_url = up.state().get("nats", "")
    t0 = time.monotonic()
    duration = args.soak * 60
    warmup_s = min(max(0.1 * duration, 120.0), duration / 2)
    samples: list[dict] = []

    async def sample() -> dict:
        rec = {"t_s": round(time.monotonic() - t0, 1), "rss_bytes": await asyncio.to_thread(stack_rss, up),
               "loadavg": list(os.getloadavg()), "jetstream": await jetstream_usage(nats_url) if nats_url else None}
        samples.append(rec)
        mib = {k: round((v or 0) / 2**20, 1) for k, v in rec["rss_bytes"].items()}
        print(f"soak t={rec['t_s']:.0f}s rss_mib={mib} js={rec['jetstream']} load={rec['loadavg'][0]:.2f}",
              flush=True)
        return rec

    start = (await sample())["rss_bytes"]
    while (left := t0 + duration - time.monotonic()) > 0:
        await asyncio.sleep(min(args.sample_s, left))
        await sample()
    end = samples[-1]["rss_bytes"]
    pids1 = await asyncio.to_thread(up.pids)
    t1 = time.monotonic()   # the streams open now may finish (up to --hang-s) before they are counted
    while any(s.end is None and s.start <= t1 and time.monotonic() < s.start + args.hang_s for s in load.records):
        await asyncio.sleep(0.1)
    growth = {k: (100.0 * (end[k] - v) / v if v and end.get(k) else None) for k, v in start.items()}
    trend = {k: rss_trend([(r["t_s"], r["rss_bytes"].get(k)) for r in samples], warmup_s) for k in start}
    summary = window_summary(load.records, t0, t1)
    mib = lambda b: (b or 0) / 2**20   # noqa: E731
    print(f"soak {args.soak} min: " + ", ".join(f"{k} {mib(start[k]):.0f}->{mib(end.get(k)):.0f} MiB" for k in start))
    for k, tr in trend.items():
        if "growth_pct" in tr:
            print(f"  {k:12} start {mib(tr['start_bytes']):.1f} warm {mib(tr['warm_bytes']):.1f} end "
                  f"{mib(tr['end_bytes']):.1f} MiB: {tr['growth_pct']:+.1f}% from start, "
                  f"{tr['growth_after_warmup_pct']:+.1f}% after warm-up, "
                  f"slope {_fmt(tr['slope_pct_per_h'], '+.2f')}%/h")
    return {"minutes": args.soak, "sample_s": args.sample_s, "warmup_s": warmup_s,
            "rss_start_bytes": start, "rss_end_bytes": end, "rss_growth_pct": growth, "rss_trend": trend,
            "samples": samples, "restarted": sorted(k for k, p in pids0.items() if pids1.get(k) != p), **summary}


def _fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def _refused_by(details: str) -> str:
    """Which decision refused a burst request, from its message: the router's gate names every replica;
    the batcher refuses on arrival, or later while the request waits (re-predicted)."""
    if "on every replica" in details:
        return "router_gate"
    return "batcher_requeued" if "now exceeds its deadline" in details else "batcher_arrival"


def _spread(xs: list[float]) -> dict:
    if not xs:
        return {"count": 0}
    return {"count": len(xs), "p50": round(percentile(xs, 50), 4), "p90": round(percentile(xs, 90), 4),
            "max": round(max(xs), 4)}


def print_row(r: dict) -> None:
    failed = ",".join(f"{k}={v}" for k, v in sorted(r["failed"].items())) or "0"
    at = r["in_flight_at_fault"]
    print(f"{r['fault']:16} detect {_fmt(r['detect_s']):>6}s  recover {_fmt(r['recover_s']):>6}s  "
          f"streams {r['streams']:>4}  failed {failed:>12}  migrated {_fmt(r['migrated'], '.0f'):>3}  "
          f"lost {r['lost_silently']}  hung {r['hung']}  (in flight at the fault: {at['streams']}, "
          f"completed {at['completed']})", flush=True)


def stack_overrides(args) -> dict:
    return dict(router_port=0, nats_port=0, kv_manager_port=0, worker_base_port=0, model=args.model,
                workers=args.workers, num_kv_blocks=args.num_kv_blocks, max_model_len=args.max_model_len,
                heartbeat_interval_s=0.5, startup_timeout_s=args.startup_timeout_s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="switchyard bench chaos", description=__doc__.splitlines()[0])
    ap.add_argument("--faults", default=None, help=f"comma-separated, in order (default: all, "
                                                   f"{','.join(FAULTS)}; none with --soak)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--streams", type=int, default=4, help="steady greedy streams")
    ap.add_argument("--max-tokens", type=int, default=32, help="per steady stream (ignore_eos)")
    ap.add_argument("--stop-s", type=float, default=20.0, help="how long SIGSTOP holds a process")
    ap.add_argument("--hang-s", type=float, default=30.0, help="a stream open this long after the fault is hung")
    ap.add_argument("--recover-timeout-s", type=float, default=120.0)
    ap.add_argument("--settle-s", type=float, default=2.0, help="steady load before the first and between faults")
    ap.add_argument("--huge-mb", type=int, default=60)
    ap.add_argument("--burst-factor", type=int, default=10)
    ap.add_argument("--burst-deadline-s", type=float, default=0.0, help="the burst's deadlines (default --hang-s)")
    ap.add_argument("--cancels", type=int, default=1000)
    ap.add_argument("--soak", type=float, default=0.0, metavar="MINUTES", help="then moderate load this long; RSS")
    ap.add_argument("--sample-s", type=float, default=30.0, help="--soak: seconds between RSS samples")
    ap.add_argument("--num-kv-blocks", type=int, default=512)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--startup-timeout-s", type=float, default=300.0)
    ap.add_argument("--workdir", default=None, help="stack work directory (default: a temp one, kept on failure)")
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args(argv)
    if args.faults is None:
        args.faults = "" if args.soak else ",".join(FAULTS)
    args.faults = [f for f in args.faults.split(",") if f]
    unknown = [f for f in args.faults if f not in FAULTS]
    if unknown:
        ap.error(f"unknown fault(s) {unknown}; choose from {', '.join(FAULTS)}")
    if args.workers < 1:
        ap.error("--workers must be at least 1")

    machine = machine_info("cpu")   # load average before the stack starts
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sy-chaos-"))
    up = UpStack(workdir, stack_overrides(args))
    ok = False
    try:
        up.wait_ready(args.startup_timeout_s + 60)
        rss0 = stack_rss(up)
        result = asyncio.run(run_chaos(args, up))
        ok = True
    finally:
        leftovers = up.stop()
    report = {"machine": machine, "config": {k: v for k, v in vars(args).items() if k != "json_path"},
              "rss_start_bytes": rss0, **result, "leftover_pids": leftovers}
    totals = {k: sum(r[k] for r in result["faults"]) for k in ("lost_silently", "hung", "failed_total")}
    totals["lost_silently"] += sum(r["fault_requests_lost_silently"] for r in result["faults"])
    if "soak" in result:
        for k in totals:
            totals[k] += result["soak"][k]
    report["totals"] = totals
    print(f"total: failed {totals['failed_total']}, lost silently {totals['lost_silently']}, hung {totals['hung']}"
          f"  (logs in {workdir})")
    if args.json_path:
        write_json(args.json_path, report)
    if ok and not args.workdir and not leftovers:
        import shutil
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
