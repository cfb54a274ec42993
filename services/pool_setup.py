"""Launcher glue for a model pool (`switchyard up --pool switchyard.toml`): kept out of launcher.py.

The catalogue's [stack] table (and its [stack.engine]) fills StackConfig and engine fields still at
their defaults (the command line and --config win); the launcher itself then starts no fixed
workers (PoolManager starts each model's min_replicas once the router is up); `model` becomes the
catalogue's default model.
"""
from __future__ import annotations

import os
from dataclasses import asdict, replace
from pathlib import Path

from common.catalog import SOURCES_ENV, load_catalog
from common.config import StackConfig, engine_config_from, split_engine_keys, write_config
from common.ports import check_free, free_port


def apply_stack_overrides(cfg: StackConfig, overrides: dict) -> StackConfig:
    stack_keys, engine_keys = split_engine_keys(overrides, "[stack]")
    defaults = StackConfig()
    take = {k: v for k, v in stack_keys.items() if getattr(cfg, k) == getattr(defaults, k)}
    take_engine = {k: v for k, v in engine_keys.items() if getattr(cfg.engine, k) == getattr(defaults.engine, k)}
    if take_engine:
        take["engine"] = engine_config_from({**asdict(cfg.engine), **take_engine}, "[stack.engine]")
    return replace(cfg, **take) if take else cfg


def make_pool(stack):
    """-> (cfg, config_path, PoolManager) for Stack.__init__."""
    # The pool forks replicas while this process runs gRPC (its control server, the launcher's health
    # checks). gRPC's fork handlers then run in the child between fork and exec and can abort it
    # ("Check failed: next_worker->state == KICKED"); the child only execs, so turn them off. Must
    # be set before grpc is first imported (nothing imports it before Stack.__init__).
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    from services.pool import PoolManager
    cfg: StackConfig = stack.cfg
    path = str(Path(cfg.pool_config).resolve())
    catalog = load_catalog(path)
    cfg = apply_stack_overrides(cfg, catalog.stack)
    port = free_port(cfg.host) if cfg.pool_control_port == 0 else check_free(cfg.pool_control_port, "pool", cfg.host)
    cfg = replace(cfg, pool_config=path, pool_control_port=port, workers=0, model=catalog.default_model)
    pool = PoolManager(cfg, catalog, stack.workdir, stack.log_dir)
    os.environ[SOURCES_ENV] = str(pool.sources_path)   # inherited by every child: tokenizer lookups
    config_path = write_config(cfg, stack.workdir / "stack-config.json")
    return cfg, config_path, pool
