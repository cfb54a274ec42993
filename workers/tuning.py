"""Defaults chosen from the machine (issue 19 item 6): measured at worker start-up, not guessed.

On a 2-core box the worker's torch threads compete with the router, batcher, KV index and NATS: with
2 threads the stack added 52 ms to TTFT, with 1 thread 1.6 ms. And a step's length is what every
running stream waits between tokens: a 512-token budget lets one newcomer's prefill chunk stall
every decode for as long as 512 prompt tokens take. So, right after loading its model (before it
reports SERVING), a worker started by `switchyard up` times:

* a decode step of DECODE_BATCH requests and prefill chunks of CHUNKS tokens at each candidate
  thread count (`torch.set_num_threads`), and keeps the fewest threads within a margin of the
  fastest (25% on <= 4 cores, where the services need a core; 10% above);
* the batch token budget (`max_num_batched_tokens`, which is also the prefill chunk size: a prompt
  is cut into what the budget leaves) from the prefill time fitted as a + b x tokens at those
  threads: the largest budget whose step stays under `tune_step_target_ms`;
* the batcher's admission window from the decode step (a quarter of it, 1-5 ms): waiting longer
  to gather a burst delays first tokens by more than batching their prefill saves.

A key the config sets is kept (num_threads set or $OMP_NUM_THREADS; a budget or window other than
its default); `auto_tune = false` keeps every default; unset (None), `switchyard up` measures and the
stacks tests and benchmarks start do not (`bench serve --auto-tune` does). The result (choices, reasons, measured
figures) is a JSON file ($SWITCHYARD_TUNING_FILE) the launcher reads before it starts the worker's
batcher with the chosen budget and window, and shows in stack.json and `switchyard status`. A
restarted worker reuses it. Measuring takes about a second (MEASURE_BUDGET_S bounds it on a busy machine).
"""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.config import StackConfig
from workers.engine.config import EngineConfig

TUNING_FILE_ENV = "SWITCHYARD_TUNING_FILE"       # where the worker writes (or, on restart, reads) its tuning
TUNING_MEASURE_ENV = "SWITCHYARD_TUNING_MEASURE"  # "1": this worker measures; else it waits for the file
DEFAULT_BUDGET = EngineConfig().max_num_batched_tokens
DEFAULT_WINDOW_MS = StackConfig().admission_window_ms
CHUNKS = (16, 64)           # prefill chunk sizes timed (two points of the a + b x tokens fit)
DECODE_BATCH = 4            # requests in the timed decode step
DECODE_STEPS = 5            # decode steps timed (median)
MEASURE_BUDGET_S = 2.0      # past this, thread counts not timed yet are skipped (a loaded machine)
MAX_BUDGET = 8192


@dataclass
class ThreadTiming:
    threads: int
    decode_ms: float                                  # one decode step of DECODE_BATCH requests (median)
    prefill_ms: dict[int, float] = field(default_factory=dict)   # chunk tokens -> ms ({}: not timed, too slow)


@dataclass
class Tuning:
    """What a worker chose and why; None: that key is not the tuner's (set in the config)."""
    cores: int
    workers: int
    num_threads: int | None = None
    max_num_batched_tokens: int | None = None
    admission_window_ms: float | None = None
    reasons: dict[str, str] = field(default_factory=dict)   # key -> why (measured figures)
    measured: list[ThreadTiming] = field(default_factory=list)
    step_target_ms: float = 0.0
    measure_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Tuning":
        d = dict(d)
        d["measured"] = [ThreadTiming(m["threads"], m["decode_ms"], {int(k): v for k, v in m["prefill_ms"].items()})
                         for m in d.get("measured", [])]
        return cls(**d)


# ---- what to tune ------------------------------------------------------------------------------
def machine_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def wanted(cfg: StackConfig) -> dict[str, bool]:
    """Which keys the machine chooses for this config: the ones it leaves at their defaults."""
    on = cfg.auto_tune and cfg.backend == "switchyard" and cfg.engine.device == "cpu"
    return {"num_threads": on and not cfg.engine.num_threads and not os.environ.get("OMP_NUM_THREADS"),
            "max_num_batched_tokens": on and cfg.engine.max_num_batched_tokens == DEFAULT_BUDGET,
            "admission_window_ms": on and cfg.admission_window_ms == DEFAULT_WINDOW_MS}


def thread_candidates(cores: int, workers: int) -> list[int]:
    """Thread counts worth timing: the worker's share of the cores, one less, half, and 1 when few."""
    share = max(1, cores // max(1, workers))
    cands = {share, max(1, share - 1), max(1, share // 2)}
    if share <= 4:
        cands.add(1)
    return sorted(cands)


# ---- the choices (pure: unit-tested with injected timings) -------------------------------------
def choose_threads(timings: list[ThreadTiming], cores: int) -> tuple[int, str]:
    best = min(timings, key=lambda t: t.decode_ms)
    margin = 0.25 if cores <= 4 else 0.10
    pick = min((t for t in timings if t.decode_ms <= best.decode_ms * (1 + margin)), key=lambda t: t.threads)
    figures = ", ".join(f"{t.threads}: {t.decode_ms:.1f} ms" for t in sorted(timings, key=lambda t: t.threads))
    why = f"decode step of {DECODE_BATCH} by threads ({figures})"
    if pick is best:
        return pick.threads, f"{pick.threads} thread(s): fastest; {why}"
    return pick.threads, (f"{pick.threads} thread(s): within {margin:.0%} of the fastest ({best.threads}), leaving "
                          f"{cores - pick.threads} of {cores} cores to the other processes; {why}")


def fit_prefill(prefill_ms: dict[int, float]) -> tuple[float, float]:
    """(a ms, b ms/token) of a step time a + b x tokens through the timed chunks."""
    pts = sorted(prefill_ms.items())
    (n1, t1), (n2, t2) = pts[0], pts[-1]
    b = (t2 - t1) / (n2 - n1) if n2 > n1 else t2 / n2
    if b <= 0:   # noise: a bigger chunk timed faster; fall back to the average per token
        b = t2 / n2
    return max(0.0, t2 - b * n2), b


def choose_budget(prefill_ms: dict[int, float], step_target_ms: float, block_size: int,
                  max_num_seqs: int) -> tuple[int, str]:
    """The largest token budget (a block multiple) whose step stays under step_target_ms; at least
    enough for a decode token per seat (up to 32: more seats than that cannot all decode within the
    target on a machine this slow anyway), at most MAX_BUDGET."""
    a, b = fit_prefill(prefill_ms)
    raw = (step_target_ms - a) / b
    floor = max(block_size, min(max_num_seqs, 32))
    budget = int(min(MAX_BUDGET, max(floor, raw)) // block_size * block_size) or block_size
    fit = f"a step of n tokens takes {a:.1f} + {b:.3f} x n ms (prefill {1000.0 / b:,.0f} tok/s)"
    if raw < floor:
        return budget, (f"{budget} tokens, the floor (a decode token per seat): {fit}, so even {budget} tokens "
                        f"take {a + b * budget:.0f} ms, over the {step_target_ms:g} ms step target")
    return budget, (f"{budget} tokens: {fit}, so {budget} tokens take {a + b * budget:.0f} ms, under the "
                    f"{step_target_ms:g} ms step target")


def choose_window(decode_ms: float) -> tuple[float, str]:
    ms = round(min(5.0, max(1.0, decode_ms / 4)) * 2) / 2
    return ms, (f"{ms:g} ms: a quarter of a {decode_ms:.1f} ms decode step (1-5 ms); gathering a burst longer "
                f"delays its first tokens more than batching the prefills saves")


def decide(timings: list[ThreadTiming], *, cores: int, workers: int, want: dict[str, bool], ecfg: EngineConfig,
           step_target_ms: float, fixed_threads: int | None = None) -> Tuning:
    """The Tuning for measured timings: threads (if wanted) first, the rest at those threads."""
    t = Tuning(cores, workers, step_target_ms=step_target_ms, measured=list(timings))
    if want.get("num_threads"):
        t.num_threads, t.reasons["num_threads"] = choose_threads(timings, cores)
        at = next(x for x in timings if x.threads == t.num_threads)
    else:
        at = next((x for x in timings if x.threads == fixed_threads), timings[0])
    if want.get("max_num_batched_tokens"):
        t.max_num_batched_tokens, t.reasons["max_num_batched_tokens"] = choose_budget(
            at.prefill_ms, step_target_ms, ecfg.block_size, ecfg.max_num_seqs)
    if want.get("admission_window_ms"):
        t.admission_window_ms, t.reasons["admission_window_ms"] = choose_window(at.decode_ms)
    return t


# ---- measuring (the worker, its model loaded) ---------------------------------------------------
def measure(runner, candidates: list[int], chunks: tuple[int, ...] = CHUNKS,
            budget_s: float = MEASURE_BUDGET_S) -> list[ThreadTiming]:
    """Time a decode step and prefill chunks at each thread count on a loaded ModelRunner (before it
    serves: the KV blocks used are the batcher's to allocate later, and every one is written before
    it is read). A count whose decode step is over twice the best so far skips its prefill timing;
    past budget_s the counts left are skipped. Leaves torch at the last count timed."""
    import torch

    from workers.engine.plan import NewRequestPlan, RunningRequestPlan, StepPlan
    from workers.engine.sampling_params import SamplingParams
    bs = runner.block_size
    sp = SamplingParams(max_tokens=1 << 20, temperature=0.0, ignore_eos=True)
    vocab = runner.model_config.vocab_size
    chunks = tuple(c for c in chunks if -(-c // bs) + DECODE_BATCH <= runner.num_blocks
                   and c < runner.max_model_len) or (min(bs, runner.max_model_len - 1),)
    step = 0

    def run(plan_of) -> float:
        nonlocal step
        step += 1
        t0 = time.perf_counter()
        runner.execute(plan_of(step))
        return (time.perf_counter() - t0) * 1000

    def prefill(n: int) -> float:
        rid = f"__tune_p{step + 1}__"
        ms = run(lambda k: StepPlan(k, new_requests=[NewRequestPlan(
            rid, [(7 + 31 * i + k) % (vocab - 1) + 1 for i in range(n)], n, 0, n, list(range(-(-n // bs))), sp, 0)]))
        run(lambda k: StepPlan(k, finished_ids=[rid]))
        return ms

    def decode_steps(n_steps: int) -> list[float]:
        ids = [f"__tune_d{step + 1}_{i}__" for i in range(DECODE_BATCH)]
        plen = max(1, bs - n_steps - 2)   # the prompt and every decoded token stay in the request's one block
        run(lambda k: StepPlan(k, new_requests=[NewRequestPlan(rid, [(3 + 17 * j + i) % (vocab - 1) + 1
                                                                     for j in range(plen)], plen, 0, plen, [i], sp, 0)
                                                for i, rid in enumerate(ids)]))
        out = [run(lambda k: StepPlan(k, running=[RunningRequestPlan(rid, 1) for rid in ids]))
               for _ in range(n_steps)]
        run(lambda k: StepPlan(k, finished_ids=ids))
        return out

    t_start = time.perf_counter()
    out: list[ThreadTiming] = []
    for i, threads in enumerate(candidates):
        if i and time.perf_counter() - t_start > budget_s:
            break
        torch.set_num_threads(threads)
        decode_steps(1)                       # first calls at this thread count: untimed
        if i == 0:
            for n in chunks:
                prefill(n)
        d = statistics.median(decode_steps(DECODE_STEPS))
        if out and d > 2 * min(t.decode_ms for t in out):
            out.append(ThreadTiming(threads, d))   # clearly slower: its prefill is not worth timing
            continue
        out.append(ThreadTiming(threads, d, {n: prefill(n) for n in chunks}))
    return out


def tune_runner(runner, cfg: StackConfig, ecfg: EngineConfig) -> Tuning:
    """Measure on this worker's runner and decide; sets torch's threads to the choice."""
    import torch
    want = wanted(cfg)
    cores = machine_cores()
    workers = max(1, cfg.workers)
    fixed = ecfg.num_threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or torch.get_num_threads()
    cands = thread_candidates(cores, workers) if want["num_threads"] else [fixed]
    t0 = time.perf_counter()
    timings = measure(runner, cands)
    t = decide(timings, cores=cores, workers=workers, want=want, ecfg=ecfg, step_target_ms=cfg.tune_step_target_ms,
               fixed_threads=fixed)
    t.measure_s = round(time.perf_counter() - t0, 3)
    skipped = [c for c in cands if c not in {x.threads for x in timings}]
    if skipped and "num_threads" in t.reasons:
        t.reasons["num_threads"] += f"; not timed: {skipped} (measuring ran past {MEASURE_BUDGET_S:g} s)"
    torch.set_num_threads(t.num_threads or fixed)
    return t


# ---- the file between worker and launcher -------------------------------------------------------
def write_tuning(path: str | Path, t: Tuning) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(t.to_dict(), indent=1))
    os.replace(tmp, p)   # readers never see half a file


def read_tuning(path: str | Path) -> Tuning | None:
    try:
        return Tuning.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def wait_tuning(path: str | Path, timeout: float, alive=lambda: True, poll_s: float = 0.05) -> Tuning:
    """The tuning file once written (the worker writes it once, after loading its model). Raises
    TimeoutError, or RuntimeError when `alive()` turns false first."""
    deadline = time.monotonic() + timeout
    while True:
        t = read_tuning(path)
        if t is not None:
            return t
        if not alive():
            raise RuntimeError(f"the worker exited before writing its tuning ({path}); see its log")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no tuning in {path} after {timeout:.0f}s")
        time.sleep(poll_s)


def apply_tuning(cfg: StackConfig, t: Tuning) -> StackConfig:
    """cfg with the tuned keys (the ones the tuner chose; the rest as configured)."""
    from dataclasses import replace
    engine = cfg.engine
    if t.num_threads is not None:
        engine = replace(engine, num_threads=t.num_threads)
    if t.max_num_batched_tokens is not None:
        engine = replace(engine, max_num_batched_tokens=t.max_num_batched_tokens)
    window = cfg.admission_window_ms if t.admission_window_ms is None else t.admission_window_ms
    return replace(cfg, engine=engine, admission_window_ms=window)


def summary(t: Tuning) -> dict:
    """The stack.json / `switchyard status` view: chosen values and why."""
    return {"num_threads": t.num_threads, "max_num_batched_tokens": t.max_num_batched_tokens,
            "admission_window_ms": t.admission_window_ms, "reasons": t.reasons, "cores": t.cores,
            "measure_s": t.measure_s, "step_target_ms": t.step_target_ms,
            "measured": [asdict(m) for m in t.measured]}
