"""The `switchyard` command: up, generate, status, bench."""
from __future__ import annotations

import argparse
import json
import os
import sys

from services.config import DEFAULT_ROUTER_PORT, load_config


def default_router() -> str:
    return os.environ.get("SWITCHYARD_ROUTER") or f"localhost:{DEFAULT_ROUTER_PORT}"


def _channel(target: str):
    import grpc

    from services.rpc import options
    return grpc.insecure_channel(target, options=options())


def cmd_up(args) -> int:
    from services.launcher import run_up
    from services.ports import PortInUseError
    try:
        cfg = load_config(args.config, workers=args.workers, router_port=args.port, model=args.model)
        return run_up(cfg, args.workdir, demo=args.demo)
    except (PortInUseError, ValueError, FileNotFoundError) as e:
        print(f"switchyard up: {e}", file=sys.stderr)
        return 2


def cmd_generate(args) -> int:
    from services.client import stream_generate
    return stream_generate(args.router, args.prompt, model=args.model, max_tokens=args.max_tokens,
                           temperature=args.temperature, seed=args.seed, chat=args.chat,
                           timeout=args.timeout, verbose=args.verbose)


def status_dict(router: str, timeout: float = 5.0) -> dict:
    from google.protobuf.json_format import MessageToDict

    from protos.switchyard.v1 import inference_pb2_grpc, kv_index_pb2
    with _channel(router) as ch:
        st = inference_pb2_grpc.AdminStub(ch).Status(kv_index_pb2.StatusRequest(), timeout=timeout)
    return MessageToDict(st, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def cmd_status(args) -> int:
    import grpc
    try:
        st = status_dict(args.router)
    except grpc.RpcError as e:
        print(f"switchyard status: cannot reach the router at {args.router}: {e.code().name}", file=sys.stderr)
        return 1
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
    return 0


def cmd_bench(args, rest: list[str]) -> int:
    if args.what == "overhead":
        from bench.overhead import main as bench_main
    else:
        from bench.engine_bench import main as bench_main  # written beside the engine; imported lazily
    return bench_main(rest) or 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="switchyard", description="Switchyard LLM inference platform")
    sub = ap.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="start nats, kv_manager, router and workers; Ctrl-C drains and stops")
    up.add_argument("--config", help="TOML or JSON file (keys: services/config.py StackConfig)")
    up.add_argument("--port", type=int, default=None, help=f"router port (default {DEFAULT_ROUTER_PORT}; 0 = any free)")
    up.add_argument("--workers", type=int, default=None, help="batcher+worker pairs (default 1)")
    up.add_argument("--model", default=None, help="model name (default smollm2-135m)")
    up.add_argument("--workdir", default=None, help="logs, nats store and stack.json (default: a temp dir)")
    up.add_argument("--demo", metavar="PROMPT", default=None,
                    help="once ready, stream a chat completion of PROMPT from the default model")

    gen = sub.add_parser("generate", help="stream a completion to the terminal")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--chat", action="store_true", help="send the prompt as one user chat message")
    gen.add_argument("--timeout", type=float, default=300.0)
    gen.add_argument("--verbose", "-v", action="store_true", help="print usage after the text")
    gen.add_argument("--router", default=default_router())

    st = sub.add_parser("status", help="workers, queue depth, running requests, KV usage")
    st.add_argument("--json", action="store_true")
    st.add_argument("--router", default=default_router())

    b = sub.add_parser("bench", help="benchmarks: overhead (platform vs bare engine) or engine")
    b.add_argument("what", choices=["overhead", "engine"])
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    if argv[:1] == ["bench"]:
        # Everything after `bench <what>` belongs to the benchmark's own parser.
        args, rest = ap.parse_known_args(argv[:2])
        return cmd_bench(args, argv[2:])
    args = ap.parse_args(argv)
    return {"up": cmd_up, "generate": cmd_generate, "status": cmd_status}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
