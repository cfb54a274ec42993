"""The `switchyard` command: up, generate, status, bench."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from common.config import DEFAULT_ROUTER_PORT, load_config
from workers.engine.config import DTYPES, LORA_MODES


def default_router() -> str:
    return os.environ.get("SWITCHYARD_ROUTER") or f"localhost:{DEFAULT_ROUTER_PORT}"


# `switchyard up` flags for the common engine settings (the rest: `[engine]` in --config).
ENGINE_FLAGS = ("device", "dtype", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "kv_cache_memory_gb",
                "gpu_memory_utilization", "use_cuda_graphs", "lora_mode")


def up_config(args):
    """`switchyard up`'s StackConfig: flags win over --config keys, which win over the defaults."""
    return load_config(args.config, engine={k: getattr(args, k) for k in ENGINE_FLAGS}, triton_port=args.triton_port,
                       http_port=args.http_port,
                       embedding_workers=args.embedding_workers,
                       workers=args.workers, router_port=args.port, nats_port=args.nats_port,
                       kv_manager_port=args.kv_index_port, worker_base_port=args.worker_base_port,
                       pool_control_port=args.pool_control_port, model=args.model,
                       trace_file=os.path.abspath(args.trace_file) if args.trace_file else None,
                       otlp_endpoint=args.otlp_endpoint, trace_sample_ratio=args.trace_sample_ratio,
                       gpu_usd_per_hour=args.gpu_usd_per_hour,
                       pool_config=os.path.abspath(args.pool) if args.pool else None,
                       tls=True if getattr(args, "tls", False) else None,   # TLS on every hop (common/tls.py)
                       tls_dir=os.path.abspath(args.tls_dir) if getattr(args, "tls_dir", None) else None,
                       tls_client_auth=getattr(args, "tls_client_auth", None))


def effective_config(args):
    """What `switchyard up` would run: up_config plus a pool catalogue's [stack] table."""
    cfg = up_config(args)
    if cfg.pool_config:
        from common.catalog import load_catalog
        from services.pool_setup import apply_stack_overrides
        cfg = apply_stack_overrides(cfg, load_catalog(cfg.pool_config).stack)
    return cfg


def cmd_up(args) -> int:
    from common.ports import PortInUseError
    from services.launcher import run_up
    try:
        if args.print_config:
            from common.config import render_config
            print(render_config(effective_config(args), args.print_config), end="")
            return 0
        cfg = up_config(args)
        if cfg.auto_tune is None and not args.config and not args.pool:   # `make run`: defaults from the machine
            from dataclasses import replace
            cfg = replace(cfg, auto_tune=True)
        return run_up(cfg, args.workdir, demo=args.demo)
    except (PortInUseError, ValueError, FileNotFoundError) as e:
        print(f"switchyard up: {e}", file=sys.stderr)
        return 2


def cmd_generate(args) -> int:
    from services.client import stream_generate
    return stream_generate(args.router, args.prompt, model=args.model, max_tokens=args.max_tokens,
                           temperature=args.temperature, seed=args.seed, chat=args.chat,
                           timeout=args.timeout, verbose=args.verbose, intent=args.intent)


def status_dict(router: str, timeout: float = 5.0) -> dict:
    from common.rpc import message_dict, sync_channel
    from protos.switchyard.v1 import inference_pb2_grpc, kv_index_pb2
    with sync_channel(router) as ch:
        st = inference_pb2_grpc.AdminStub(ch).Status(kv_index_pb2.StatusRequest(), timeout=timeout)
    d = message_dict(st)
    # Metrics endpoints and the log folder come from the launcher's state file (the router does not
    # know them); state_pointer finds it for any spelling of the router's address.
    from services.launcher import state_pointer
    try:
        state = json.loads(state_pointer(router).read_text())
        d["metrics"] = state.get("metrics", {})
        d["trace_file"] = state.get("trace_file", "")
        d["logs"] = state.get("logs", "")
        # Per supervised unit: state (up / restarting), restarting_since (epoch s), restarts, last exit code.
        d["services"] = state.get("services", {})
        d["tuning"] = state.get("tuning")   # defaults chosen from the machine (workers/tuning.py), and why
    except (OSError, ValueError):
        pass
    import grpc

    from services.pool_cli import models_dict
    try:   # per model: state, version, replicas, desired, queue depth (the model pool's view)
        d["models"] = models_dict(router, timeout)
    except grpc.RpcError:   # an older router (UNIMPLEMENTED), or it went away meanwhile: no models section
        pass
    return d


def cmd_status(args) -> int:
    import grpc
    try:
        st = status_dict(args.router)
    except grpc.RpcError as e:
        print(f"switchyard status: cannot reach the router at {args.router}: {e.code().name}", file=sys.stderr)
        return 1
    from services.tenant_cli import tenants_dict
    try:   # per tenant: usage over the last hour (services/tenant_cli.py)
        st["tenants"] = tenants_dict(args.router)
    except grpc.RpcError:   # no admin token with auth required, or an older router: no tenants section
        pass
    if args.json:
        print(json.dumps(st, indent=1))
        return 0
    print(f"{'worker':8} {'model':16} {'health':9} {'running':>7} {'waiting':>7} {'kv used':>8} "
          f"{'free blk':>9} {'cache hit':>9} {'in flight':>9}")
    for w in st["workers"]:
        health = "draining" if w["draining"] else ("ok" if w["healthy"] else "DOWN")
        print(f"{w['worker_id']:8} {w['model'][:16]:16} {health:9} {w['num_running']:>7} {w['num_waiting']:>7} "
              f"{100 * w['kv_usage']:>7.1f}% {w['num_free_blocks']:>4}/{w['num_blocks']:<4} "
              f"{100 * w['prefix_cache_hit_rate']:>8.1f}% {w['router_in_flight']:>9}")
    if not st["workers"]:
        print("(no workers)")
    print_services(st.get("services", {}))
    from services.machine_defaults import describe
    for line in describe(st.get("tuning")):
        print(("\n" if line.startswith("defaults") else "") + line)
    from services.pool_cli import print_models_table
    print_models_table(args.router, header=True)
    from services.tenant_cli import print_tenants_table
    print_tenants_table(st.get("tenants"))
    return 0


def print_services(services: dict) -> None:
    """The launcher's supervision table: each unit's state, restarts and last exit code."""
    if not services:
        return
    import time
    print(f"\n{'service':12} {'state':22} {'restarts':>8} {'last exit':>9}  pids")
    for name, u in services.items():
        state = u["state"]
        if state == "restarting" and u.get("restarting_since"):
            state += f" ({time.time() - u['restarting_since']:.0f}s)"
        code = "" if u.get("last_exit_code") is None else str(u["last_exit_code"])
        if code and u.get("last_exited") and u["last_exited"] != name:
            code = f"{code} ({u['last_exited'].split('-')[0]})"
        pids = " ".join(f"{n}={p}" for n, p in u.get("pids", {}).items())
        print(f"{name:12} {state:22} {u['restarts']:>8} {code:>9}  {pids}")


def cmd_trace(args) -> int:
    from telemetry.breakdown import main as breakdown_main
    return breakdown_main([args.path] + (["--json"] if args.json else []))


# `switchyard bench <what>`: the module whose main(argv) runs it (imported only when chosen).
BENCHES = {
    "batch": "bench.batch_bench",
    "overhead": "bench.overhead",
    "engine": "bench.engine_bench",
    "tracing": "bench.tracing_overhead",
    "serve": "bench.serve",
    "compare": "bench.compare",
    "triton": "bench.triton_overhead",
    "pool": "bench.pool_bench",
    "tenants": "bench.tenants_bench",
    "lora": "bench.lora_bench",
    "step": "bench.step_bench",
    "tls": "bench.tls_bench",
    "chaos": "bench.chaos",
    "profiles": "bench.profiles",
    "embed": "bench.embed_bench",
}

# Commands whose options are their module's own parser: `switchyard <cmd> [...]` -> main(argv).
PASS_THROUGH = {
    "tenants": "services.tenant_cli",
    "batch": "services.batch_cli",
    "eval": "bench.eval",
    "certs": "services.certs",
}


def cmd_bench(args, rest: list[str]) -> int:
    return importlib.import_module(BENCHES[args.what]).main(rest) or 0


def add_tls_client_flags(p: argparse.ArgumentParser) -> None:
    """A TLS router's CA and a client certificate (mTLS); default: $SWITCHYARD_TLS_CA / _CERT / _KEY,
    else the local stack's stack.json."""
    p.add_argument("--tls-ca", default=None, metavar="PEM", help="CA of a TLS router (default: $SWITCHYARD_TLS_CA "
                                                                "or the local stack's)")
    p.add_argument("--tls-cert", default=None, metavar="PEM", help="client certificate for mTLS")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="its key")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="switchyard", description="Switchyard LLM inference platform")
    sub = ap.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="start nats, kv_manager, router and workers; Ctrl-C drains and stops")
    up.add_argument("--config", help="TOML or JSON file (keys: common/config.py StackConfig)")
    up.add_argument("--port", type=int, default=None, help=f"router port (default {DEFAULT_ROUTER_PORT}; 0 = any free)")
    up.add_argument("--nats-port", type=int, default=None, metavar="P",
                    help="NATS port (default: a free one; config nats_port)")
    up.add_argument("--kv-index-port", type=int, default=None, metavar="P",
                    help="KV index service port (default: a free one; config kv_manager_port)")
    up.add_argument("--worker-base-port", type=int, default=None, metavar="P",
                    help="worker i listens on P + i (default: free ones; config worker_base_port)")
    up.add_argument("--pool-control-port", type=int, default=None, metavar="P",
                    help="with --pool: the launcher's internal pool service (default: a free one)")
    up.add_argument("--workers", type=int, default=None, help="batcher+worker pairs (default 1)")
    up.add_argument("--embedding-workers", type=int, default=None, metavar="N",
                    help="embedding batcher+worker pairs e0.. serving embedding_model for Inference/Embed "
                         "(default 0; `make run` starts 1)")
    up.add_argument("--model", default=None, help="model name (default smollm2-135m)")
    up.add_argument("--workdir", default=None, help="logs, nats store and stack.json (default: a temp dir, "
                                                    "removed after a clean stop)")
    up.add_argument("--http-port", type=int, default=None, metavar="P",
                    help="also serve the OpenAI-compatible HTTP API on port P (0 = any free): /v1/chat/completions, "
                         "/v1/completions, /v1/embeddings, /v1/models, /v1/files, /v1/batches")
    up.add_argument("--triton-port", type=int, default=None, metavar="P",
                    help="also serve the Triton/KServe v2 gRPC protocol on port P (0 = any free), for tritonclient")
    up.add_argument("--demo", metavar="PROMPT", default=None,
                    help="once ready, stream a chat completion of PROMPT from the default model")
    up.add_argument("--trace-file", default=None, metavar="PATH",
                    help="also write every finished span as OTLP JSON lines to PATH (see `switchyard trace`)")
    up.add_argument("--otlp-endpoint", default=None, metavar="URL",
                    help="export spans over OTLP gRPC, e.g. http://localhost:4317 (Jaeger); "
                         "default $OTEL_EXPORTER_OTLP_ENDPOINT")
    up.add_argument("--trace-sample-ratio", type=float, default=None,
                    help="fraction of new traces sampled (parent-based; default 1.0)")
    up.add_argument("--pool", default=None, metavar="TOML",
                    help="serve a pool of models from a catalogue (switchyard.toml; see examples/pool.toml)")
    up.add_argument("--gpu-usd-per-hour", type=float, default=None,
                    help="USD per GPU-hour of each worker for the cost metrics (config gpu_usd_per_hour)")
    up.add_argument("--print-config", nargs="?", const="toml", choices=["toml", "json"], default=None,
                    help="print the effective configuration (defaults, --config, flags) as TOML (or json) and exit")
    up.add_argument("--tls", action="store_true", default=None,
                    help="TLS on every hop, mutual inside, NATS users per service (config tls); development "
                         "certificates in <workdir>/tls unless --tls-dir / tls_dir (`switchyard certs`)")
    up.add_argument("--tls-dir", default=None, metavar="DIR", help="certificates from `switchyard certs --out DIR`")
    up.add_argument("--tls-client-auth", default=None, choices=["none", "required"],
                    help="front doors: require a client certificate (mTLS; config tls_client_auth)")
    eng = up.add_argument_group("engine (per worker; config [engine] table, which has every EngineConfig key)")
    eng.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default cpu)")
    eng.add_argument("--dtype", default=None, choices=DTYPES, help="default auto: bfloat16 on CUDA, float32 on CPU")
    eng.add_argument("--max-num-seqs", type=int, default=None, metavar="N", help="running requests per step")
    eng.add_argument("--max-num-batched-tokens", type=int, default=None, metavar="N",
                     help="token budget per step (decodes + prefill chunks)")
    eng.add_argument("--max-model-len", type=int, default=None, metavar="N",
                     help="context length limit (default: the model's)")
    eng.add_argument("--kv-cache-memory-gb", type=float, default=None, metavar="GB",
                     help="KV cache size on CPU (unless engine.num_kv_blocks is set)")
    eng.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="F",
                     help="share of GPU memory for weights + KV cache on CUDA")
    eng.add_argument("--cuda-graphs", dest="use_cuda_graphs", action=argparse.BooleanOptionalAction, default=None,
                     help="capture CUDA graphs for decode steps (default on)")
    eng.add_argument("--lora-mode", default=None, choices=LORA_MODES, help="LoRA batching kernel (default auto)")

    gen = sub.add_parser("generate", help="stream a completion to the terminal")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None)
    gen.add_argument("--intent", default=None, help="no --model: a capability hint for the router (model pool)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--chat", action="store_true", help="send the prompt as one user chat message")
    gen.add_argument("--timeout", type=float, default=300.0)
    gen.add_argument("--verbose", "-v", action="store_true", help="print usage after the text")
    gen.add_argument("--router", default=default_router())
    add_tls_client_flags(gen)

    st = sub.add_parser("status", help="workers, queue depth, running requests, KV usage")
    st.add_argument("--json", action="store_true")
    st.add_argument("--router", default=default_router())
    add_tls_client_flags(st)

    from services.adapter_cli import add_parsers as add_adapter_parsers
    from services.pool_cli import add_parsers as add_pool_parsers
    admin_sub = add_pool_parsers(sub, default_router())
    add_adapter_parsers(sub, admin_sub, default_router())

    tr = sub.add_parser("trace", help="read a --trace-file")
    trsub = tr.add_subparsers(dest="trace_cmd", required=True)
    bd = trsub.add_parser("breakdown", help="per-component p50/p90/p99 and share of TTFT and end-to-end time")
    bd.add_argument("path")
    bd.add_argument("--json", action="store_true")

    b = sub.add_parser("bench", help="benchmarks: overhead (platform vs bare engine), engine, tracing, "
                                     "serve (load test: latency percentiles, goodput, cost), compare, "
                                     "step (host ms per engine step, forward a no-op)")
    b.add_argument("what", choices=list(BENCHES))
    # `switchyard eval [...]`: its options are bench/eval.py's own parser (dispatched in main)
    sub.add_parser("eval", add_help=False, help="accuracy on the fixed eval set, and answers changed vs the baseline "
                                                "(--inproc | --router ADDR, --subset N, --matrix, --write-baseline)")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    if argv[:1] == ["bench"]:
        # Everything after `bench <what>` belongs to the benchmark's own parser.
        args, rest = ap.parse_known_args(argv[:2])
        return cmd_bench(args, argv[2:])
    if argv[:1] and argv[0] in PASS_THROUGH:
        return importlib.import_module(PASS_THROUGH[argv[0]]).main(argv[1:]) or 0
    args = ap.parse_args(argv)
    if getattr(args, "router", None) and args.cmd != "up":   # TLS to the router: flags, env or stack.json
        from services.client_tls import configure_client_tls
        try:
            configure_client_tls(args.router, getattr(args, "tls_ca", None), getattr(args, "tls_cert", None),
                                 getattr(args, "tls_key", None))
        except ValueError as e:
            print(f"switchyard {args.cmd}: {e}", file=sys.stderr)
            return 2
    if args.cmd in ("models", "admin", "adapters"):
        return args.func(args)
    return {"up": cmd_up, "generate": cmd_generate, "status": cmd_status, "trace": cmd_trace}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
