"""Import tritonclient's gRPC modules (client, aio client, service stubs, protos) in one place,
lazily, so Switchyard runs without tritonclient unless a Triton backend or front door is used."""
from __future__ import annotations

import threading

_lock = threading.Lock()
_mods = None


def load():
    """(tritonclient.grpc, tritonclient.grpc.aio, service_pb2, service_pb2_grpc, model_config_pb2, utils)."""
    global _mods
    if _mods is None:
        with _lock:
            if _mods is None:
                try:
                    import tritonclient.grpc as tg
                    import tritonclient.grpc.aio as aio
                    from tritonclient import utils
                    from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
                except ImportError as e:
                    raise ImportError(f"the Triton backend and front door need the Python package "
                                      f"'tritonclient[grpc]==2.73.0' ({e})") from e
                _mods = (tg, aio, service_pb2, service_pb2_grpc, model_config_pb2, utils)
    return _mods
