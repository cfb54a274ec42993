"""A local client's TLS towards a router (`switchyard generate`, `status`, the admin commands): the CA
and client certificate from flags, the environment, or the local stack's stack.json."""
from __future__ import annotations

import json
import os


def configure_client_tls(router: str, ca: str | None = None, cert: str | None = None,
                         key: str | None = None) -> bool:
    """This process's TLS towards `router` (common/tls.py; every rpc.sync_channel then uses it): the
    flags, else $SWITCHYARD_TLS_CA / $SWITCHYARD_TLS_CERT / $SWITCHYARD_TLS_KEY, else the "tls" section
    of the local stack's stack.json (the CA and the CLI's client certificate). False: plaintext."""
    from common import tls
    ca = ca or os.environ.get("SWITCHYARD_TLS_CA", "")
    cert = cert or os.environ.get("SWITCHYARD_TLS_CERT", "")
    key = key or os.environ.get("SWITCHYARD_TLS_KEY", "")
    if not ca:
        from services.launcher import state_pointer
        try:
            state = json.loads(state_pointer(router).read_text()).get("tls") or {}
        except (OSError, ValueError):
            state = {}
        ca = state.get("ca", "")
        if not cert and state.get("client_cert"):
            cert, key = state["client_cert"], state.get("client_key", "")
    if not ca:
        return False
    tls.configure(tls.client_settings(ca, cert, key))
    return True
