"""`switchyard adapters [--json]`, `switchyard admin load-adapter NAME PATH` and `admin unload-adapter NAME`."""
from __future__ import annotations

import json
import os
import sys


def adapters_dict(router: str, base: str = "", timeout: float = 5.0) -> list[dict]:
    from google.protobuf.json_format import MessageToDict

    from common.rpc import sync_channel
    from protos.switchyard.v1 import inference_pb2, inference_pb2_grpc
    with sync_channel(router) as ch:
        resp = inference_pb2_grpc.InferenceStub(ch).ListAdapters(inference_pb2.ListAdaptersRequest(base_model=base),
                                                                 timeout=timeout)
    return [MessageToDict(a, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
            for a in resp.adapters]


def cmd_adapters(args) -> int:
    import grpc
    try:
        adapters = adapters_dict(args.router, args.base or "")
    except grpc.RpcError as e:
        print(f"switchyard adapters: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(adapters, indent=1))
        return 0
    print(f"{'adapter':20} {'base':16} {'origin':9} {'capabilities':20} {'workers':16} path")
    for a in adapters:
        print(f"{a['name'][:20]:20} {a['base_model'][:16]:16} {a['origin']:9} {','.join(a['capabilities'])[:20]:20} "
              f"{','.join(a['workers']) or '-':16} {a['path']}")
    if not adapters:
        print("(no adapters)")
    return 0


def cmd_admin_adapter(args) -> int:
    from services.client import admin_call
    def call(stub, pb, md):
        if args.admin_cmd == "load-adapter":
            # The workers read the path; a folder that exists here is sent absolute (same machine).
            path = os.path.abspath(args.path) if os.path.isdir(args.path) else args.path
            return stub.LoadAdapter(pb.LoadAdapterRequest(
                name=args.name, path=path, base_model=args.base or "", capabilities=args.capability or []),
                metadata=md, timeout=args.timeout)
        return stub.UnloadAdapter(pb.UnloadAdapterRequest(name=args.name, drain_timeout_s=args.drain_timeout),
                                  metadata=md, timeout=args.timeout)
    return admin_call(args, call, lambda r: r.message + (f" ({r.host_mb:.1f} MB)" if getattr(r, "host_mb", 0) else ""))


def add_parsers(sub, admin_sub, default_router: str) -> None:
    """`adapters` on the top-level subparsers; load-adapter / unload-adapter under `admin`."""
    ls = sub.add_parser("adapters", help="LoRA adapters: base model, origin, which workers serve each")
    ls.add_argument("--base", default=None, help="only adapters of this base model")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--router", default=default_router)
    ls.set_defaults(func=cmd_adapters)

    for name, help_ in (("load-adapter", "load a LoRA adapter (PEFT folder) on every worker of its base model"),
                        ("unload-adapter", "stop serving a LoRA adapter (accepted requests finish first)")):
        p = admin_sub.add_parser(name, help=help_)
        p.add_argument("name")
        if name == "load-adapter":
            p.add_argument("path", help="PEFT folder (adapter_config.json + adapter_model.safetensors) on the workers")
            p.add_argument("--base", default=None, help="base model (default: the stack's model)")
            p.add_argument("--capability", action="append", default=None, help="a capability it serves (repeatable)")
            p.add_argument("--timeout", type=float, default=60.0)
        else:
            p.add_argument("--drain-timeout", type=float, default=0.0,
                           help="seconds to wait for accepted requests using it (default 60)")
            p.add_argument("--timeout", type=float, default=120.0)
        p.add_argument("--token", default=None, help="admin token (default $SWITCHYARD_ADMIN_TOKEN)")
        p.add_argument("--json", action="store_true")
        p.add_argument("--router", default=default_router)
        p.set_defaults(func=cmd_admin_adapter)
