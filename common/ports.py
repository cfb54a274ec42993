"""Port helpers: pick free loopback ports and fail clearly when a configured one is taken."""
from __future__ import annotations

import socket


class PortInUseError(RuntimeError):
    """A configured port is already bound by another process."""


# Ports free_port has handed out in this process. A picked port is only bound later, by the child
# it is given to, so the OS could offer it again meanwhile; never hand out one twice.
_handed_out: set[tuple[str, int]] = set()


def _os_free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral port that is free right now (the OS picks it), distinct from every port this
    process picked before."""
    for _ in range(100):
        port = _os_free_port(host)
        if (host, port) not in _handed_out:
            _handed_out.add((host, port))
            return port
    raise RuntimeError(f"no free port on {host} that was not handed out already")


def is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR so a port whose last connections sit in TIME_WAIT (a stack just stopped)
        # counts as free, as it is for the servers, which bind with it too. On Linux a port that
        # something is listening on still fails to bind, so it is still reported as taken.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
