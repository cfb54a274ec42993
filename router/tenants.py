"""Tenants: who is calling, and what they may do (issue 17).

The tenant table lives in the stack config (`[tenants.<name>]`, or `[stack.tenants.<name>]` in a pool
catalogue). Each front-door RPC resolves its caller once, in the checked-servicer wrapper
(common/rpc.py `add_checked_servicer(..., authorize=...)`), from `authorization: Bearer <token>` (or a
client certificate subject listed in `cert_subjects`, when the TLS helper is there):

* auth = "required": no, a malformed, an unknown or a revoked token -> UNAUTHENTICATED;
* auth = "off" (the local default): callers without a known token are tenant `default`.

Tokens are compared as SHA-256 digests with hmac.compare_digest over every entry (no early exit); the
config may hold them plain or as "sha256:<hex>". No token text is ever put in a log or an error message.
Admin tokens (config admin_tokens) are a separate role: they pass the Admin service, not Inference.
"""
from __future__ import annotations

import contextvars
import hashlib
import hmac
import re
from dataclasses import dataclass, field

import grpc

DEFAULT_TENANT = "default"
AUTH_MODES = ("off", "required")
SERVICE_CLASSES = ("interactive", "batch")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")   # also a NATS KV key part (router/quotas.py)
_TOKEN = re.compile(r"^[\x21-\x7e]{8,512}$")    # printable ASCII, no spaces
ADMIN_SERVICE = "switchyard.v1.Admin"
# Open to any caller: liveness probes of the Triton protocol, and Admin/Status (workers, queues, KV; no
# tenant data), which the launcher's readiness wait and `switchyard status` call without a token.
OPEN_METHODS = frozenset({"/inference.GRPCInferenceService/ServerLive",
                          "/inference.GRPCInferenceService/ServerReady",
                          "/switchyard.v1.Admin/Status"})


@dataclass(frozen=True)
class Tenant:
    name: str
    weight: float = 1.0
    service_classes: tuple[str, ...] = SERVICE_CLASSES
    default_class: str = "interactive"
    tokens_per_minute: int = 0        # input + output tokens; 0: no rate quota
    max_streams: int = 0              # concurrent Generate streams over all routers; 0: no limit
    max_queued: int = 0               # admitted, no first token yet, over all routers; 0: no limit
    max_tokens: int = 0               # largest sampling.max_tokens accepted; 0: no limit
    models: tuple[str, ...] = ()      # allowed models; empty: every model
    adapters: tuple[str, ...] | None = None   # allowed LoRA adapters; None: every adapter, (): none
    priority_ceiling: int = 100       # a request's priority is clamped to this
    cert_subjects: tuple[str, ...] = ()
    token_digests: tuple[bytes, ...] = field(default=(), repr=False)
    revoked_digests: tuple[bytes, ...] = field(default=(), repr=False)

    @property
    def has_quota(self) -> bool:
        return bool(self.tokens_per_minute or self.max_streams or self.max_queued)

    def may_use_model(self, model: str) -> bool:
        return not self.models or model in self.models or model.split("@", 1)[0] in self.models

    def may_use_adapter(self, adapter: str) -> bool:
        return self.adapters is None or adapter in self.adapters

    def service_class(self, requested: str) -> str:
        """The request's class when this tenant may use it, else the tenant's default."""
        return requested if requested in self.service_classes else self.default_class


TENANT_KEYS = ("tokens", "revoked_tokens", "weight", "service_classes", "default_class", "tokens_per_minute",
               "max_streams", "max_queued", "max_tokens", "models", "adapters", "priority_ceiling",
               "cert_subjects")


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _stored_digest(t: str, where: str) -> bytes:
    t = str(t)
    if t.startswith("sha256:"):
        try:
            d = bytes.fromhex(t[7:])
        except ValueError:
            d = b""
        if len(d) != 32:
            raise ValueError(f"{where}: a sha256: token must be 64 hex digits")
        return d
    if not _TOKEN.match(t):   # the message never repeats the token
        raise ValueError(f"{where}: a token must be 8-512 printable ASCII characters without spaces")
    return digest(t)


def _strs(v, where: str) -> tuple[str, ...]:
    if isinstance(v, str) or not isinstance(v, (list, tuple)):
        raise ValueError(f"{where}: must be a list of strings")
    return tuple(str(x) for x in v)


def parse_tenant(name: str, d: dict) -> Tenant:
    where = f"tenants.{name}"
    if not _NAME.match(name):
        raise ValueError(f"{where}: a tenant name is 1-64 of [A-Za-z0-9_-]")
    if not isinstance(d, dict):
        raise ValueError(f"{where}: must be a table of {', '.join(TENANT_KEYS)}")
    unknown = sorted(set(d) - set(TENANT_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {list(TENANT_KEYS)}")
    classes = _strs(d.get("service_classes", SERVICE_CLASSES), f"{where}.service_classes")
    bad = sorted(set(classes) - set(SERVICE_CLASSES))
    if bad or not classes:
        raise ValueError(f"{where}.service_classes: choose from {list(SERVICE_CLASSES)}, got {list(classes)}")
    default_class = str(d.get("default_class", classes[0]))
    if default_class not in classes:
        raise ValueError(f"{where}.default_class {default_class!r} is not in its service_classes {list(classes)}")
    weight = float(d.get("weight", 1.0))
    if not weight > 0:
        raise ValueError(f"{where}.weight must be > 0, got {weight}")
    ints = {}
    for k in ("tokens_per_minute", "max_streams", "max_queued", "max_tokens"):
        v = d.get(k, 0)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{where}.{k} must be an integer >= 0 (0: no limit), got {v!r}")
        ints[k] = v
    ceiling = d.get("priority_ceiling", 100)
    if not isinstance(ceiling, int) or not -100 <= ceiling <= 100:
        raise ValueError(f"{where}.priority_ceiling must be an integer in [-100, 100], got {ceiling!r}")
    adapters = d.get("adapters")
    return Tenant(
        name=name, weight=weight, service_classes=classes, default_class=default_class,
        models=_strs(d.get("models", ()), f"{where}.models"),
        adapters=None if adapters is None else _strs(adapters, f"{where}.adapters"),
        priority_ceiling=ceiling, cert_subjects=_strs(d.get("cert_subjects", ()), f"{where}.cert_subjects"),
        token_digests=tuple(_stored_digest(t, f"{where}.tokens") for t in _strs(d.get("tokens", ()),
                                                                                  f"{where}.tokens")),
        revoked_digests=tuple(_stored_digest(t, f"{where}.revoked_tokens")
                              for t in _strs(d.get("revoked_tokens", ()), f"{where}.revoked_tokens")),
        **ints)


class AuthError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# The caller of the RPC being served (set by TenantTable.authorize for the handler's task and the tasks
# it starts); the raw authorization value rides along so a front door can forward it to the router.
_CALLER: contextvars.ContextVar[tuple["Tenant | None", str]] = contextvars.ContextVar("switchyard_tenant",
                                                                                      default=(None, ""))


def current_tenant() -> Tenant | None:
    return _CALLER.get()[0]


def forward_metadata() -> tuple[tuple[str, str], ...]:
    """The caller's authorization header, for a front door calling the router on its behalf."""
    raw = _CALLER.get()[1]
    return (("authorization", raw),) if raw else ()


class TenantTable:
    """The tenants of a StackConfig and the caller resolution every front door shares."""

    def __init__(self, cfg):
        self.mode = str(getattr(cfg, "auth", "off") or "off").lower()
        if self.mode not in AUTH_MODES:
            raise ValueError(f"auth {self.mode!r}: choose one of {', '.join(AUTH_MODES)}")
        self.by_name: dict[str, Tenant] = {n: parse_tenant(n, d) for n, d in (getattr(cfg, "tenants", None)
                                                                              or {}).items()}
        self.default = self.by_name.get(DEFAULT_TENANT) or Tenant(DEFAULT_TENANT)
        self._tokens = [(d, t) for t in self.by_name.values() for d in t.token_digests]
        self._revoked = [d for t in self.by_name.values() for d in t.revoked_digests]
        self._admin = [digest(str(t)) for t in (getattr(cfg, "admin_tokens", None) or ())]
        self._subjects = {s: t for t in self.by_name.values() for s in t.cert_subjects}
        if self.mode == "required" and not self._tokens and not self._subjects:
            raise ValueError("auth = \"required\" but no tenant has tokens or cert_subjects: nobody could call")

    def names(self) -> list[str]:
        return sorted({*self.by_name, DEFAULT_TENANT} if self.mode == "off" else self.by_name)

    def get(self, name: str) -> Tenant | None:
        return self.default if name == DEFAULT_TENANT and self.mode == "off" else self.by_name.get(name)

    def is_admin_token(self, token: str) -> bool:
        return _member(digest(token), self._admin)

    def is_tenant_token(self, token: str) -> bool:
        return _find(digest(token), self._tokens) is not None

    def resolve(self, raw_authorization: str, subject: str | None = None, service: str = "") -> Tenant | None:
        """The caller's tenant (None: an admin on the Admin service). Raises AuthError."""
        if subject and subject in self._subjects:
            return self._subjects[subject]
        token, problem = parse_bearer(raw_authorization)
        if token:
            d = digest(token)
            found = _find(d, self._tokens)
            if found is not None:
                return found
            if service == ADMIN_SERVICE and _member(d, self._admin):
                return None
            if _member(d, self._revoked):
                raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "this token has been revoked; ask for a new one")
        if self.mode == "off":
            return self.default
        if problem:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, problem)
        if _member(digest(token), self._admin):
            raise AuthError(grpc.StatusCode.PERMISSION_DENIED,
                            "an admin token may call only the Admin service; use a tenant token")
        raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "unknown token (auth is required: use a tenant token "
                                                         "from the config's tenants table)")

    def authorizer(self, on_refused=None):
        """authorize(method, context) for common/rpc.py add_checked_servicer: resolves the caller (or
        aborts) and makes it current_tenant() for the handler. on_refused(code) counts refusals."""
        subject_of = _peer_subject_fn()

        async def authorize(method: str, context) -> None:
            raw = metadata_value(context, "authorization")
            if method in OPEN_METHODS:
                _CALLER.set((None, raw))
                return
            subject = subject_of(context) if subject_of is not None else None
            service = method.rsplit("/", 2)[-2] if method.count("/") >= 2 else ""
            try:
                tenant = self.resolve(raw, subject, service)
            except AuthError as e:
                if on_refused is not None:
                    on_refused(e.code)
                await context.abort(e.code, e.message)
                return
            _CALLER.set((tenant, raw))
        return authorize


def parse_bearer(raw: str) -> tuple[str, str]:
    """(token, "") or ("", why it is not usable); the why never contains the token."""
    if not raw:
        return "", "missing credentials: send metadata `authorization: Bearer <tenant token>`"
    scheme, _, token = raw.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return "", "malformed authorization metadata: expected `Bearer <tenant token>`"
    if not _TOKEN.match(token):
        return "", "malformed bearer token: expected 8-512 printable ASCII characters"
    return token, ""


def metadata_value(context, key: str) -> str:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode(errors="replace")
    return ""


def _member(d: bytes, digests) -> bool:
    hit = False
    for x in digests:   # no early exit: the time does not depend on which entry matched
        hit |= hmac.compare_digest(d, x)
    return hit


def _find(d: bytes, pairs) -> Tenant | None:
    found = None
    for x, t in pairs:
        if hmac.compare_digest(d, x) and found is None:
            found = t
    return found


def _peer_subject_fn():
    """common/tls.py peer_subject(context) when the TLS work is present (mTLS subject -> tenant)."""
    try:
        from common.tls import peer_subject  # type: ignore[attr-defined]
    except ImportError:
        return None
    return peer_subject
