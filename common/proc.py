"""Child processes for the launcher: own process group, die with the parent, stop in order.
Also the children's side: `stop_on_signals`, the event every service process waits on."""
from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (the launcher's stop, Ctrl-C); call inside the running loop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _child_setup() -> None:
    # Own process group, so a terminal's Ctrl-C reaches only the launcher (which then drains in
    # order) and so killpg reaches a child's own children; PDEATHSIG: if the launcher is killed
    # outright, the kernel sends SIGTERM to every child - no orphans either way.
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class Child:
    name: str
    popen: subprocess.Popen
    log_path: Path | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> bool:
        try:
            self.popen.wait(timeout=max(0.0, timeout))
            return True
        except subprocess.TimeoutExpired:
            return False

    async def exited(self) -> int | None:
        """Wait (on the running loop) until the process exits; returns its exit code. An event, not a
        poll: the process's pidfd becomes readable when it ends (Linux >= 5.3)."""
        try:
            fd = os.pidfd_open(self.popen.pid)
        except ProcessLookupError:   # gone and reaped already
            return self.popen.poll()
        except (AttributeError, OSError):   # no pidfd here (not Linux, old kernel): look twice a second
            while self.alive():
                await asyncio.sleep(0.5)
            return self.popen.returncode
        loop = asyncio.get_running_loop()
        ended = loop.create_future()
        loop.add_reader(fd, lambda: ended.done() or ended.set_result(None))
        try:
            await ended
        finally:
            loop.remove_reader(fd)
            os.close(fd)
        return self.popen.wait()   # it has exited: this only reaps it

    def stop(self, timeout: float) -> int | None:
        """SIGTERM, wait up to timeout, then SIGKILL the whole group. Returns the exit code."""
        if self.alive():
            self.signal(signal.SIGTERM)
            if not self.wait(timeout):
                self.signal(signal.SIGKILL)
                self.wait(5.0)
        # Anything the child left in its group goes too.
        self.signal(signal.SIGKILL)
        return self.popen.returncode

    def tail(self, n: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def spawn(name: str, argv: list[str], log_dir: Path, env: dict | None = None, cwd: str | None = None) -> Child:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log_file = open(log_path, "ab")
    full_env = dict(os.environ)
    full_env.update(env or {})
    p = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         preexec_fn=_child_setup, env=full_env, cwd=cwd, close_fds=True)
    log_file.close()
    return Child(name, p, log_path)


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def stop_all(children: list[Child], timeout: float) -> None:
    """Stop children together (SIGTERM all, then wait, then SIGKILL stragglers)."""
    for c in children:
        if c.alive():
            c.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for c in children:
        c.wait(deadline - time.monotonic())
    for c in children:
        c.stop(0.0)
