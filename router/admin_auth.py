"""Admin calls (Admin/LoadModel, UnloadModel) need `authorization: Bearer <admin token>`.

No or an unknown token: UNAUTHENTICATED. A known non-admin token (StackConfig.tokens, or a tenant's
token from the tenants table): PERMISSION_DENIED. With no admin_tokens configured no token is an admin
token. Admin is a role of its own: a tenant token never passes here (router/tenants.py).
"""
from __future__ import annotations

import hmac

import grpc

from router.validation import RequestError


def _bearer(context) -> str:
    for k, v in context.invocation_metadata() or ():
        if k == "authorization":
            v = v if isinstance(v, str) else v.decode()
            scheme, _, token = v.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


def _member(token: str, tokens) -> bool:
    return any(hmac.compare_digest(token.encode(), str(t).encode()) for t in tokens or ())


def check_admin(context, cfg) -> None:
    token = _bearer(context)
    if not token:
        raise RequestError(grpc.StatusCode.UNAUTHENTICATED,
                           "admin calls need metadata `authorization: Bearer <admin token>` (config admin_tokens)")
    if _member(token, cfg.admin_tokens):
        return
    if _member(token, cfg.tokens) or _tenant_token(token, cfg):
        raise RequestError(grpc.StatusCode.PERMISSION_DENIED,
                           "this token may not call the admin API; use an admin token")
    raise RequestError(grpc.StatusCode.UNAUTHENTICATED, "unknown token" + (
        "" if cfg.admin_tokens else " (no admin_tokens are configured: the admin API is disabled)"))


def _tenant_token(token: str, cfg) -> bool:
    if not getattr(cfg, "tenants", None):
        return False
    from router.tenants import TenantTable
    return TenantTable(cfg).is_tenant_token(token)
