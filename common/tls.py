"""TLS on every hop: gRPC server and channel credentials, NATS TLS and credentials, the mTLS peer.

One process-wide setting (`configure`), made once at start from the StackConfig (`tls = true`, the
files in `tls_dir` that `switchyard certs` writes) and the process's role; common/rpc.py (`bind`,
`channel`, `sync_channel`) and common/service_main.py (`connect_nats_client`) read it, so every
server, channel and NATS connection built through them is covered and no hop can be forgotten.

* Front doors (FRONT_DOORS: the router's port, the Triton front, the HTTP front) serve the front door
  certificate (`tls_cert`/`tls_key`, default <tls_dir>/<role>.pem) and, with
  `tls_client_auth = "required"`, require a client certificate chaining to `tls_client_ca` or the
  internal CA; `peer_subject` gives its subject to whoever maps it to a tenant.
* Every other gRPC server (kv_manager, worker, pool control) is mutual TLS with the internal CA:
  only holders of a certificate from it may call.
* Channels present the process's own certificate and trust the internal CA (plus tls_client_ca).
* NATS: TLS with the same CA and a client certificate, and a per-service user (NATS_USERS; the
  passwords in <tls_dir>/nats-users.json, the permissions in services/nats_server.py).

Plumbing layer: imports only the standard library, grpc, and common.config for types.
"""
from __future__ import annotations

import json
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

# Front door client certificates. No "optional": gRPC Python can ask for a client certificate only by
# requiring it (without require_client_auth it never asks, so there would be no subject to map).
CLIENT_AUTH = ("none", "required")
# Processes whose gRPC port is a front door (clients from outside): the rest are internal (mTLS).
FRONT_DOORS = ("router", "triton_front", "http_front", "openai_http")
# One certificate per service; the NATS server has its own; `service` is for any other process.
# (`switchyard certs` writes them all.)
SERVICE_CERTS = ("router", "batcher", "worker", "kv_manager", "pool", "triton_front", "http_front", "nats",
                 "service")
# Process roles (run_service names) that use another role's certificate: the pass-through and
# embedding batchers are batchers, the launcher hosts the model pool (and health-checks the router
# with the pool's certificate). A role without a certificate of its own uses `service`.
CERT_OF_ROLE = {"passthrough": "batcher", "embedding_batcher": "batcher", "embedding_worker": "worker",
                "launcher": "pool", "openai_http": "http_front"}
# NATS users, one per kind of service; a connection's name picks its user (`nats_user`).
NATS_USERS = ("router", "batcher", "kv_manager", "pool", "triton_front", "http_front", "service")
NATS_USERS_FILE = "nats-users.json"
CLI_CLIENT = "switchyard-cli"   # the local CLI's client certificate (stack.json records its paths)
_CN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


def client_cert_name(common_name: str) -> str:
    """The file stem of a client certificate for subject CN=common_name: client-<CN>."""
    if not _CN.match(common_name or ""):
        raise ValueError(f"client certificate name {common_name!r}: use letters, digits, '_', '.', '@' and '-' "
                         "(at most 64, starting with a letter or digit)")
    return f"client-{common_name}"


def nats_user(client_name: str) -> str:
    """The NATS user a connection named `client_name` logs in as: its first word that names a user
    (batcher-w0 and embedding-batcher-e0 -> batcher; openai_http -> http_front), else the restricted
    `service` user."""
    for word in re.split(r"[-.]", client_name or ""):
        word = CERT_OF_ROLE.get(word, word)
        if word in NATS_USERS:
            return word
    return "service"


@dataclass(frozen=True)
class TlsSettings:
    """What one process needs for TLS (PEM bytes; paths kept for nats-server and stack.json)."""
    role: str
    ca: bytes                       # the internal CA: servers of this stack chain to it
    cert: bytes = b""               # this process's certificate (its internal server cert and its client cert)
    key: bytes = b""
    front_cert: bytes = b""         # front door server certificate (front doors only)
    front_key: bytes = b""
    client_ca: bytes = b""          # front door: client certificates must chain to this (or to ca)
    client_auth: str = "none"       # front door: none | required
    ca_path: str = ""
    cert_path: str = ""
    key_path: str = ""
    front_cert_path: str = ""
    front_key_path: str = ""
    client_ca_path: str = ""
    nats_passwords: tuple = ()      # ((user, password), ...) from nats-users.json

    @property
    def front_door(self) -> bool:
        return self.role in FRONT_DOORS

    def nats_password(self, user: str) -> str:
        return dict(self.nats_passwords).get(user, "")


def _read(path: str | Path, what: str, key: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"TLS: cannot read the {what} {path!s} ({e.strerror}); set `{key}` or run "
                         f"`switchyard certs --out DIR` and set tls_dir = DIR") from None


def settings_from(cfg, role: str) -> TlsSettings | None:
    """The TLS settings of process `role` under StackConfig cfg; None when cfg.tls is off."""
    if not getattr(cfg, "tls", False):
        return None
    if cfg.tls_client_auth not in CLIENT_AUTH:
        raise ValueError(f"tls_client_auth {cfg.tls_client_auth!r}: choose one of {', '.join(CLIENT_AUTH)}")
    d = Path(cfg.tls_dir) if cfg.tls_dir else None
    if d is None and not (cfg.tls_ca and cfg.tls_cert and cfg.tls_key):
        raise ValueError("tls = true needs tls_dir (the folder `switchyard certs --out DIR` writes) "
                         "or `switchyard up --tls`, which makes one in the work directory")
    ca_path = cfg.tls_ca or str(d / "ca.pem")
    name = CERT_OF_ROLE.get(role, role)
    if d is not None and not (d / f"{name}.pem").exists() and (d / "service.pem").exists():
        name = "service"   # a process this list does not know yet: the generic service certificate
    cert_path = str(d / f"{name}.pem") if d else cfg.tls_cert
    key_path = str(d / f"{name}-key.pem") if d else cfg.tls_key
    front = role in FRONT_DOORS
    front_cert = _read(cfg.tls_cert or cert_path, "front door certificate", "tls_cert") if front else b""
    front_key = _read(cfg.tls_key or key_path, "front door key", "tls_key") if front else b""
    client_ca = _read(cfg.tls_client_ca, "client CA", "tls_client_ca") if cfg.tls_client_ca else b""
    passwords: tuple = ()
    if d is not None and (d / NATS_USERS_FILE).exists():
        passwords = tuple(sorted(json.loads((d / NATS_USERS_FILE).read_text()).items()))
    return TlsSettings(role=role, ca=_read(ca_path, "CA certificate", "tls_ca"),
                       cert=_read(cert_path, f"{name} certificate", "tls_dir"),
                       key=_read(key_path, f"{name} key", "tls_dir"), front_cert=front_cert, front_key=front_key,
                       client_ca=client_ca, client_auth=cfg.tls_client_auth, ca_path=ca_path,
                       cert_path=cert_path, key_path=key_path,
                       front_cert_path=(cfg.tls_cert or cert_path) if front else "",
                       front_key_path=(cfg.tls_key or key_path) if front else "",
                       client_ca_path=cfg.tls_client_ca, nats_passwords=passwords)


def client_settings(ca: str, cert: str = "", key: str = "") -> TlsSettings:
    """A client's settings (the CLI, benchmarks): trust `ca`; present cert/key when given (mTLS)."""
    if bool(cert) != bool(key):
        raise ValueError("a client certificate needs both --tls-cert and --tls-key")
    return TlsSettings(role="client", ca=_read(ca, "CA certificate", "--tls-ca"),
                       cert=_read(cert, "client certificate", "--tls-cert") if cert else b"",
                       key=_read(key, "client key", "--tls-key") if key else b"",
                       ca_path=ca, cert_path=cert, key_path=key)


# ---- the process-wide setting --------------------------------------------------------------------
_current: TlsSettings | None = None


def configure(settings: TlsSettings | None) -> None:
    """Set (None: clear) this process's TLS; servers bound and channels made afterwards use it."""
    global _current
    _current = settings


def current() -> TlsSettings | None:
    return _current


# ---- gRPC ------------------------------------------------------------------------------------------
def server_credentials(s: TlsSettings) -> grpc.ServerCredentials:
    """A front door: its certificate and the client-auth policy; anything else: mutual TLS, internal CA."""
    if s.front_door:
        if s.client_auth == "none":
            return grpc.ssl_server_credentials([(s.front_key, s.front_cert)])
        return grpc.ssl_server_credentials([(s.front_key, s.front_cert)], root_certificates=s.client_ca + s.ca,
                                           require_client_auth=True)
    return grpc.ssl_server_credentials([(s.key, s.cert)], root_certificates=s.ca, require_client_auth=True)


def channel_credentials(s: TlsSettings) -> grpc.ChannelCredentials:
    """Trust the internal CA (and the client CA); present this process's certificate when it has one."""
    if s.cert:
        return grpc.ssl_channel_credentials(root_certificates=s.ca + s.client_ca, private_key=s.key,
                                            certificate_chain=s.cert)
    return grpc.ssl_channel_credentials(root_certificates=s.ca + s.client_ca)


def peer_subject(context) -> str | None:
    """The verified client certificate's subject on this call, e.g. "CN=team-a" (RFC 2253 as gRPC
    gives it), else its common name as "CN=<cn>"; None without a verified client certificate (plaintext,
    or TLS without mTLS). `context`: a grpc.aio.ServicerContext (or a sync one)."""
    try:
        auth = context.auth_context() or {}
    except Exception:   # a context without a transport (tests' fakes): no peer certificate
        return None
    for key, fmt in (("x509_subject", "{}"), ("x509_common_name", "CN={}")):
        values = auth.get(key) or []
        if values:
            v = values[0]
            return fmt.format(v.decode() if isinstance(v, bytes) else v)
    return None


# ---- NATS and plain TLS sockets (NATS, an HTTP front door) ---------------------------------------------
def _write_temp_pem(data: bytes) -> str:
    """ssl loads certificates from files only: a private temp file (removed by the caller)."""
    import os
    import tempfile
    fd, path = tempfile.mkstemp(suffix=".pem")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _load_chain(ctx: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    import os
    cpath, kpath = _write_temp_pem(cert), _write_temp_pem(key)
    try:
        ctx.load_cert_chain(cpath, kpath)
    finally:
        os.unlink(cpath)
        os.unlink(kpath)


def client_ssl_context(s: TlsSettings) -> ssl.SSLContext:
    """An ssl client context: verify servers against the internal CA, present this process's certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=(s.ca + s.client_ca).decode())
    if s.cert:
        _load_chain(ctx, s.cert, s.key)
    return ctx


def server_ssl_context(s: TlsSettings) -> ssl.SSLContext:
    """An ssl server context with the same policy as `server_credentials` (an HTTPS front door)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cadata=(s.ca + s.client_ca).decode())
    if s.front_door:
        _load_chain(ctx, s.front_cert, s.front_key)
        ctx.verify_mode = ssl.CERT_REQUIRED if s.client_auth == "required" else ssl.CERT_NONE
    else:
        _load_chain(ctx, s.cert, s.key)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def uvicorn_ssl_options(s: TlsSettings | None) -> dict:
    """uvicorn.Config keyword arguments for an HTTPS front door with the same policy ({} without TLS).
    uvicorn takes one CA file: tls_client_ca when set (it should then hold the internal CA too), else
    the internal CA."""
    if s is None:
        return {}
    opts = dict(ssl_certfile=s.front_cert_path or s.cert_path, ssl_keyfile=s.front_key_path or s.key_path)
    if s.client_auth == "required":
        opts.update(ssl_ca_certs=s.client_ca_path or s.ca_path, ssl_cert_reqs=ssl.CERT_REQUIRED)
    return opts


def nats_connect_options(s: TlsSettings, client_name: str) -> dict:
    """nats.connect keyword arguments: TLS with this process's certificate, and the user and password of
    the connection's NATS user (`nats_user`)."""
    user = nats_user(client_name)
    password = s.nats_password(user)
    if not password:
        raise ValueError(f"TLS: no NATS password for user {user!r} in {NATS_USERS_FILE} (tls_dir); "
                         "run `switchyard certs --out <tls_dir>` to add it")
    return dict(tls=client_ssl_context(s), user=user, password=password)


def tls_url(url: str) -> str:
    """nats://host:port -> tls://host:port (a TLS connection from the first byte of the handshake on)."""
    return "tls://" + url.split("://", 1)[1] if url.startswith("nats://") else url
