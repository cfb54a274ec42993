"""`switchyard tenants`: per-tenant usage over the last hour (Admin/TenantUsage; router/tenancy.py).

    switchyard tenants [--router HOST:PORT] [--tenant NAME] [--token T] [--json]

With auth = "required" the router answers an admin token (--token, else $SWITCHYARD_ADMIN_TOKEN) with
every tenant and a tenant token ($SWITCHYARD_TOKEN) with its own row. Usage is per router replica.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from common.config import DEFAULT_ROUTER_PORT

REASONS = ("tokens_per_minute", "max_streams", "max_queued", "max_tokens", "permission")


def tenants_dict(router: str, timeout: float = 5.0, tenant: str = "", token: str = "") -> dict:
    from common.rpc import message_dict, sync_channel
    from protos.switchyard.v1 import inference_pb2, inference_pb2_grpc
    token = token or os.environ.get("SWITCHYARD_ADMIN_TOKEN", "")
    md = (("authorization", f"Bearer {token}"),) if token else None
    with sync_channel(router) as ch:
        resp = inference_pb2_grpc.AdminStub(ch).TenantUsage(inference_pb2.TenantUsageRequest(tenant=tenant),
                                                            timeout=timeout, metadata=md)
    return message_dict(resp)


def print_tenants_table(d: dict | None, out=None) -> None:
    """One row per tenant: requests, tokens in / out, refusals by reason, mean queue time, USD."""
    out = out or sys.stdout     # looked up per call: a default bound at import outlives a replaced stdout
    if not d or not d.get("tenants"):
        return
    print(f"\n{'tenant':16} {'weight':>6} {'requests':>8} {'tokens in':>10} {'tokens out':>10} {'open':>5} "
          f"{'queue s':>8} {'gpu $':>9} {'api $':>9}  refused (last {int(d.get('window_s', 3600)) // 60} min)",
          file=out)
    for r in d["tenants"]:
        refused = ", ".join(f"{k}={v}" for k, v in sorted(r.get("rejections", {}).items()) if v) or "-"
        print(f"{r['tenant'][:16]:16} {r['weight']:>6g} {r['requests']:>8} {r['prompt_tokens']:>10} "
              f"{r['completion_tokens']:>10} {r['open_streams']:>5} {r['queue_seconds_mean']:>8.3f} "
              f"{r['gpu_usd']:>9.5f} {r['api_usd']:>9.5f}  {refused}", file=out)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="switchyard tenants", description="per-tenant usage over the last hour")
    ap.add_argument("--router", default=f"127.0.0.1:{DEFAULT_ROUTER_PORT}")
    ap.add_argument("--tenant", default="", help="only this tenant")
    ap.add_argument("--token", default=None, help="admin token (default $SWITCHYARD_ADMIN_TOKEN); a tenant "
                                                  "token ($SWITCHYARD_TOKEN) sees only its tenant")
    ap.add_argument("--json", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    import grpc

    from common.rpc import describe
    args = build_parser().parse_args(argv)
    try:
        d = tenants_dict(args.router, tenant=args.tenant, token=args.token or "")
    except grpc.RpcError as e:
        print(f"switchyard tenants: {describe(e)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(d, indent=1))
        return 0
    print(f"router {d.get('router_id', '')} (auth {d.get('auth', 'off')}); usage is per router replica")
    print_tenants_table(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
