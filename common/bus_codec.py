"""Finish reasons: the engine's strings <-> common_pb2.FinishReason (the batcher's TokenChunk, the router's
relay). KV events have their own codec beside them (kv_manager/event_codec.py)."""
from __future__ import annotations

from protos.switchyard.v1 import common_pb2

FINISH_TO_PB = {None: common_pb2.FINISH_REASON_UNSPECIFIED, "stop": common_pb2.FINISH_REASON_STOP,
                "length": common_pb2.FINISH_REASON_LENGTH, "abort": common_pb2.FINISH_REASON_ABORT}
FINISH_FROM_PB = {v: k for k, v in FINISH_TO_PB.items()}
