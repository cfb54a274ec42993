"""`switchyard models [--json]` and `switchyard admin load|unload ...` (the model pool's CLI).

LoRA adapter commands (`adapters`, `admin load-adapter|unload-adapter`) live in services/adapter_cli.py; both
send their admin calls through services/client.py `admin_call`.
"""
from __future__ import annotations

import json
import sys


def models_dict(router: str, timeout: float = 5.0) -> list[dict]:
    from common.rpc import message_dict, sync_channel
    from protos.switchyard.v1 import inference_pb2, inference_pb2_grpc
    with sync_channel(router) as ch:
        resp = inference_pb2_grpc.InferenceStub(ch).ListModels(inference_pb2.ListModelsRequest(), timeout=timeout)
    return [message_dict(m) for m in resp.models]


def print_models_table(router: str, header: bool = False, out=None) -> None:
    import grpc
    out = out if out is not None else sys.stdout   # at call time: tests swap sys.stdout
    try:
        models = models_dict(router)
    except grpc.RpcError:
        return
    if header:
        print(file=out)
    print(f"{'model':16} {'version':8} {'state':9} {'replicas':>8} {'desired':>7} {'queue':>5} "
          f"{'mem GB':>6} {'$/h':>5}  {'capabilities':24} workers", file=out)
    for m in models:
        print(f"{m['name'][:16]:16} {m['version'][:8]:8} {m['state'] or '-':9} {m['replicas']:>8} "
              f"{m['desired_replicas']:>7} {m['queue_depth']:>5} {m['memory_gb']:>6.2f} {m['gpu_usd_per_hour']:>5.2f}  "
              f"{','.join(m['capabilities'])[:24]:24} {','.join(m['workers'])}", file=out)


def cmd_models(args) -> int:
    import grpc
    try:
        if args.json:
            print(json.dumps(models_dict(args.router), indent=1))
        else:
            print_models_table(args.router)
    except grpc.RpcError as e:
        print(f"switchyard models: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


def cmd_admin(args) -> int:
    from services.client import admin_call  # grpc: imported by the command that needs it, not by `switchyard up`
    def call(stub, pb, md):
        if args.admin_cmd == "load":
            return stub.LoadModel(pb.LoadModelRequest(
                name=args.name, version=args.version or "", source=args.source or "", replicas=args.replicas,
                wait=not args.no_wait), metadata=md, timeout=args.timeout)
        return stub.UnloadModel(pb.UnloadModelRequest(name=args.name, wait=not args.no_wait),
                                metadata=md, timeout=args.timeout)
    return admin_call(args, call, lambda r: r.message + (f" (evicted: {', '.join(r.evicted)})"
                                                         if getattr(r, "evicted", None) else ""))


def add_parsers(sub, default_router: str):
    """`models` and `admin load|unload` on the top-level subparsers; returns the `admin` subparsers (the
    adapter commands go there too: services/adapter_cli.py add_parsers)."""
    m = sub.add_parser("models", help="every model: state, version, replicas, queue depth, where it runs")
    m.add_argument("--json", action="store_true")
    m.add_argument("--router", default=default_router)
    m.set_defaults(func=cmd_models)

    a = sub.add_parser("admin", help="admin (needs an admin token): models load / unload / hot-swap, "
                                     "LoRA adapters load-adapter / unload-adapter")
    asub = a.add_subparsers(dest="admin_cmd", required=True)
    for name, help_ in (("load", "load a model, scale it to --replicas, or hot-swap it to --version"),
                        ("unload", "drain and unload a model")):
        p = asub.add_parser(name, help=help_)
        p.add_argument("name")
        if name == "load":
            p.add_argument("--version", default=None)
            p.add_argument("--source", default=None, help="source of a new version (default: the catalogue's)")
            p.add_argument("--replicas", type=int, default=0)
        p.add_argument("--no-wait", action="store_true", help="answer at once; the work continues")
        p.add_argument("--token", default=None, help="admin token (default $SWITCHYARD_ADMIN_TOKEN)")
        p.add_argument("--timeout", type=float, default=600.0)
        p.add_argument("--json", action="store_true")
        p.add_argument("--router", default=default_router)
        p.set_defaults(func=cmd_admin)
    return asub
