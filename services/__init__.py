"""The roof: launcher, model pool, front doors, CLI.

The launcher and the pool fork child processes (fork + exec, for PR_SET_PDEATHSIG) while gRPC
threads of this process are busy; gRPC's fork handlers then re-initialise its poller in the child
between fork and exec and can abort it ("ev_epoll1_linux.cc: Check failed", a child dying with
SIGABRT). Children exec at once, so they need no gRPC state: turn the handlers off before grpc is
first imported (this package is imported before any of its modules).
"""
import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
