"""One configuration: StackConfig nests the engine's EngineConfig (one set of defaults); every engine
key reaches a worker unchanged; `switchyard up` flags win over the file; --print-config round-trips.
Also the one service skeleton (common/service_main.py): drain and stop order, a cut-short start."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from dataclasses import MISSING, asdict, fields, replace

import pytest

from common.catalog import parse_catalog
from common.config import ENGINE_ALIASES, StackConfig, load_config, render_config, write_config
from common.service_main import Service, serve
from services.cli import build_parser, main, up_config
from services.pool import replica_config
from workers.engine.config import EngineConfig
from workers.main import engine_config


def parse_up(*flags: str) -> StackConfig:
    return up_config(build_parser().parse_args(["up", *flags]))


def non_default_engine_values() -> dict:
    """A value for every EngineConfig field that differs from its default (new fields included)."""
    special = {"device": "cuda:1", "dtype": "bfloat16", "lora_mode": "bmm", "speculative_method": "self_draft",
               "draft_model": "/models/draft", "draft_random_weights": "llama-1b"}
    out = {}
    for f in fields(EngineConfig):
        default = f.default_factory() if f.default is MISSING else f.default
        t = str(f.type)
        if f.name in special:
            v = special[f.name]
        elif t == "bool":
            v = not default
        elif t.startswith("int"):
            v = (default or 0) + 3
        elif t.startswith("float"):
            v = (default or 0.0) + 0.25
        elif t.startswith("dict"):
            v = {"ad-1": "/adapters/one", "ad2": "/adapters/two"}
        elif t == "str":
            v = f"not-{default}"
        else:
            raise AssertionError(f"EngineConfig.{f.name}: no test value for type {t}")
        assert v != default, f.name
        out[f.name] = v
    return out


def toml_value(v) -> str:
    """Written by hand here (inline tables), not by the code under test."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{ " + ", ".join(f'"{k}" = {toml_value(x)}' for k, x in v.items()) + " }"
    return json.dumps(v) if isinstance(v, str) else repr(v)


# ---- one set of defaults -------------------------------------------------------------------------

def test_a_stacks_engine_defaults_are_the_engines():
    assert StackConfig().engine == EngineConfig()
    assert load_config(None).engine == EngineConfig()
    assert parse_up().engine == EngineConfig()
    assert not {f.name for f in fields(StackConfig)} & {f.name for f in fields(EngineConfig)}, \
        "an engine setting duplicated at the top level of StackConfig"


# ---- every engine key reaches the worker -------------------------------------------------------------

def test_every_engine_key_from_a_toml_file_reaches_the_workers_engine_config_unchanged(tmp_path):
    values = non_default_engine_values()
    conf = tmp_path / "stack.toml"
    conf.write_text("workers = 2\n\n[engine]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))
    cfg = load_config(conf)
    assert asdict(cfg.engine) == values
    assert engine_config(cfg) == EngineConfig(**values)
    # The launcher hands every child one JSON file; the worker reads its engine from it as a whole.
    handed = load_config(write_config(cfg, tmp_path / "stack-config.json"))
    assert handed == cfg and engine_config(handed) == EngineConfig(**values)


def test_a_worker_derives_only_num_threads_when_unset():
    cfg = StackConfig(workers=2, engine=EngineConfig(max_num_seqs=7, dtype="float16"))
    ecfg = engine_config(cfg)
    assert ecfg.num_threads and ecfg.num_threads >= 1
    assert replace(ecfg, num_threads=None) == cfg.engine


def test_a_pool_replica_gets_the_models_engine_keys_over_the_stacks():
    catalog = parse_catalog({"models": [
        {"name": "a", "source": "random:tiny", "max_context": 256, "engine": {"dtype": "float16", "max_num_seqs": 5}},
        {"name": "b", "source": "random:tiny"}]})
    cfg = StackConfig(engine=EngineConfig(max_num_seqs=9, use_cuda_graphs=False, max_model_len=1024))
    a = engine_config(replica_config(cfg, catalog, catalog.get("a"), "random:tiny"))
    assert (a.dtype, a.max_num_seqs, a.use_cuda_graphs, a.max_model_len) == ("float16", 5, False, 256)
    b = engine_config(replica_config(cfg, catalog, catalog.get("b"), "random:tiny"))
    assert (b.dtype, b.max_num_seqs, b.use_cuda_graphs, b.max_model_len) == ("auto", 9, False, 1024)
    with pytest.raises(ValueError, match=r"models\[0\]\.engine"):
        parse_catalog({"models": [{"name": "a", "source": "x", "engine": {"max_num_seq": 5}}]})


# ---- flat keys, errors -----------------------------------------------------------------------------

def test_the_flat_engine_aliases_still_work_and_nothing_is_accepted_twice(tmp_path):
    conf = tmp_path / "flat.toml"
    conf.write_text("max_num_seqs = 4\nnum_kv_blocks = 64\n[engine]\ndtype = \"float16\"\n")
    cfg = load_config(conf)
    assert (cfg.engine.max_num_seqs, cfg.engine.num_kv_blocks, cfg.engine.dtype) == (4, 64, "float16")
    assert load_config(None, max_waiting=16).engine.max_waiting == 16     # tests and benches pass these
    assert set(ENGINE_ALIASES) <= {f.name for f in fields(EngineConfig)}
    conf.write_text("max_num_seqs = 4\n[engine]\nmax_num_seqs = 5\n")
    with pytest.raises(ValueError, match="both"):
        load_config(conf)
    conf.write_text("max_num_batched_tokens = 64\n")          # an engine key, not an alias
    with pytest.raises(ValueError, match=r"under \[engine\]"):
        load_config(conf)
    conf.write_text("[engine]\nmax_num_seq = 4\n")
    with pytest.raises(ValueError, match="unknown engine keys"):
        load_config(conf)
    conf.write_text("[engine]\ndtype = \"float8\"\n")
    with pytest.raises(ValueError, match="dtype"):
        load_config(conf)


# ---- switchyard up: flags and --print-config -------------------------------------------------------

def test_engine_flags_win_over_the_config_file(tmp_path):
    conf = tmp_path / "stack.toml"
    conf.write_text("[engine]\nmax_num_seqs = 4\nmax_model_len = 300\ndtype = \"float16\"\nuse_cuda_graphs = true\n")
    cfg = parse_up("--config", str(conf), "--max-num-seqs", "9", "--no-cuda-graphs", "--device", "cuda",
                   "--kv-cache-memory-gb", "0.5", "--gpu-memory-utilization", "0.5", "--lora-mode", "sgmv",
                   "--max-num-batched-tokens", "128")
    e = cfg.engine
    assert (e.max_num_seqs, e.use_cuda_graphs, e.device, e.kv_cache_memory_gb, e.gpu_memory_utilization,
            e.lora_mode, e.max_num_batched_tokens) == (9, False, "cuda", 0.5, 0.5, "sgmv", 128)
    assert (e.max_model_len, e.dtype) == (300, "float16")     # from the file: no flag given
    assert parse_up("--config", str(conf), "--dtype", "bf16", "--max-model-len", "64").engine.dtype == "bf16"
    assert engine_config(cfg).max_num_seqs == 9


@pytest.mark.parametrize("fmt", ["toml", "json"])
def test_print_config_round_trips(tmp_path, capsys, fmt):
    values = non_default_engine_values()
    conf = tmp_path / "stack.json"
    conf.write_text(json.dumps({"workers": 3, "admin_tokens": ["t\"1", "t2"], "trace_file": "/tmp/a b.jsonl",
                                "gpu_usd_per_hour_by_worker": {"w1": 3.0}, "engine": values}))
    flags = ["--config", str(conf), "--max-num-seqs", "11", "--port", "6100"]
    assert main(["up", *flags, "--print-config", fmt]) == 0
    printed = tmp_path / f"printed.{fmt}"
    printed.write_text(capsys.readouterr().out)
    again = load_config(printed)
    assert again == parse_up(*flags)
    assert (again.engine.max_num_seqs, again.router_port, again.workers) == (11, 6100, 3)
    assert render_config(again, fmt) == printed.read_text()


def test_print_config_of_the_defaults_round_trips(tmp_path, capsys):
    assert main(["up", "--print-config"]) == 0
    printed = tmp_path / "printed.toml"
    printed.write_text(capsys.readouterr().out)
    assert "[engine]" in printed.read_text()
    assert load_config(printed) == StackConfig()


# ---- the service skeleton ------------------------------------------------------------------------

def _serve(start) -> bool:
    svc = Service("test", StackConfig(drain_grace_s=0.25), argparse.Namespace())
    return asyncio.run(serve(svc, start))


def test_run_service_drains_then_stops_in_reverse_order():
    log: list[str] = []

    async def start(svc):
        async def note(what):
            log.append(what)
        svc.on_stop(lambda: note("nats"))
        svc.on_stop(lambda: note("service"))
        svc.on_drain(lambda grace: note(f"drain {grace}"))
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)

    started = _serve(start)
    assert started and log == ["drain 0.25", "service", "nats"]


def test_a_signal_during_start_cuts_it_short_and_still_stops():
    log: list[str] = []

    async def start(svc):
        async def note(what):
            log.append(what)
        svc.on_stop(lambda: note("stopped"))
        svc.on_drain(lambda grace: note("drained"))
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
        await asyncio.sleep(60)   # a model load

    started = _serve(start)
    assert not started and log == ["stopped"]


def test_a_failed_start_stops_what_it_started_and_raises():
    log: list[str] = []

    async def start(svc):
        async def note(what):
            log.append(what)
        svc.on_stop(lambda: note("stopped"))
        raise TimeoutError("worker not ready")

    with pytest.raises(TimeoutError):
        _serve(start)
    assert log == ["stopped"]
