"""Port helpers: pick free loopback ports and fail clearly when a configured one is taken."""
from __future__ import annotations

import socket


class PortInUseError(RuntimeError):
    """A configured port is already bound by another process."""


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # No SO_REUSEADDR: we want to see a port that something is listening on as taken.
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def check_free(port: int, what: str, host: str = "127.0.0.1") -> int:
    """Return port, or raise PortInUseError saying which setting to change."""
    if not is_free(port, host):
        raise PortInUseError(
            f"{what} port {port} on {host} is already in use; stop whatever holds it "
            f"(e.g. `ss -ltnp | grep :{port}`) or choose another port in the config / flags")
    return port
