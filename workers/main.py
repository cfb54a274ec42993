"""Worker process: `python -m workers.main --port P [--model M] [--config FILE]`."""
from __future__ import annotations

import os
from dataclasses import replace

from common.config import StackConfig
from common.service_main import Service, run_service
from workers.tuning import TUNING_FILE_ENV, TUNING_MEASURE_ENV

SERVICE = "switchyard.v1.Worker"


def tune(runner, cfg: StackConfig, ecfg) -> None:
    """Measure this machine's defaults (workers/tuning.py) when the launcher asked this worker to
    ($SWITCHYARD_TUNING_FILE and ..._MEASURE=1), or take a restarted worker's earlier choice."""
    path = os.environ.get(TUNING_FILE_ENV)
    if not path or os.environ.get(TUNING_MEASURE_ENV) != "1":
        return
    import logging

    import torch

    from workers.tuning import Tuning, machine_cores, read_tuning, tune_runner, write_tuning
    log = logging.getLogger("switchyard.worker")
    t = read_tuning(path)
    if t is None:
        try:
            t = tune_runner(runner, cfg, ecfg)
            log.warning("tuned from the machine in %.2fs: %s", t.measure_s,
                        "; ".join(f"{k} = {v}" for k, v in t.reasons.items()))
        except Exception:  # noqa: BLE001 - a bug in measuring must not keep the worker from serving
            log.exception("measuring this machine's defaults failed; keeping the configured ones")
            t = Tuning(machine_cores(), cfg.workers, reasons={"error": "measuring failed (worker log)"})
        write_tuning(path, t)   # the launcher starts the batcher once this exists
    if t.num_threads:
        torch.set_num_threads(t.num_threads)


def engine_config(cfg: StackConfig):
    """This worker's EngineConfig: the stack's `engine` as a whole. Only num_threads, when not set, is
    derived here: $OMP_NUM_THREADS, else this machine's cores shared among the stack's workers."""
    if cfg.engine.num_threads:
        return cfg.engine
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or max(1, (os.cpu_count() or 1) // max(1, cfg.workers))
    return replace(cfg.engine, num_threads=threads)


async def start(svc: Service) -> None:
    import asyncio
    import logging

    from protos.switchyard.v1 import worker_pb2_grpc
    from telemetry import metrics
    from workers.engine.loader import load_model
    from workers.engine.model_runner import ModelRunner, resolve_dtype
    from workers.service import WorkerServicer

    cfg, args = svc.cfg, svc.args
    ecfg = engine_config(cfg)
    # A worker that does not measure waits for the one that does (they would compete for the cores).
    tuning_file = os.environ.get(TUNING_FILE_ENV)
    if tuning_file and os.environ.get(TUNING_MEASURE_ENV) != "1":
        from workers.tuning import wait_tuning
        loop = asyncio.get_running_loop()
        t = await loop.run_in_executor(None, wait_tuning, tuning_file, cfg.startup_timeout_s)
        ecfg = replace(ecfg, num_threads=t.num_threads or ecfg.num_threads)
    servicer = WorkerServicer(None, args.served_name or cfg.model, ecfg.device,
                              metrics=metrics.WorkerMetrics(cfg.model, args.worker_id))
    ep = svc.grpc_server([SERVICE], args.port, grace_s=2.0)
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, ep.server)
    await ep.start(serving=False)   # listen first: health answers NOT_SERVING while the model loads

    loop = asyncio.get_running_loop()
    loaded = await loop.run_in_executor(None, lambda: load_model(
        cfg.model, device=ecfg.device, dtype=resolve_dtype(ecfg), random_weights=None, seed=ecfg.seed))
    runner = ModelRunner(loaded, ecfg)
    await loop.run_in_executor(servicer._executor, tune, runner, cfg, ecfg)
    if runner.lora is not None:   # a configured adapter this base cannot serve is a config error: fail fast
        for name in runner.lora.names():
            await loop.run_in_executor(None, runner.lora.prefetch, name)
    servicer.runner = runner
    await loop.run_in_executor(servicer._executor, servicer.warmup)
    servicer.ready = True
    await ep.set_serving(True)
    logging.getLogger("switchyard.worker").info("worker %s serving %s on port %d", args.worker_id, cfg.model,
                                                ep.port)


def main(argv: list[str] | None = None) -> None:
    run_service("worker", start, description="Switchyard worker (Worker gRPC service)", argv=argv,
                flags=("port", "host", "model", "worker-id", "served-name"), required=("port",))


if __name__ == "__main__":
    main()
