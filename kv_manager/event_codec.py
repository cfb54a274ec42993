"""KV events (kv_manager/events.py) <-> their NATS form, bus_pb2.KvEventBatch (`sy.kv.<worker>`).

The batcher encodes one batch per engine step (batcher/nats_edge.py); the KV index service decodes them
(kv_manager/service.py).
"""
from __future__ import annotations

from kv_manager.block_hash import HASH_MASK  # block hashes are uint64 already; masked for the wire type
from kv_manager.events import CLEARED, REMOVED, STORED, KvEvent
from protos.switchyard.v1 import bus_pb2

_KIND_TO_PB = {STORED: bus_pb2.KV_EVENT_KIND_STORED, REMOVED: bus_pb2.KV_EVENT_KIND_REMOVED,
               CLEARED: bus_pb2.KV_EVENT_KIND_CLEARED}
_KIND_FROM_PB = {v: k for k, v in _KIND_TO_PB.items()}


def kv_events_to_proto(worker_id: str, seq: int, events: list[KvEvent]) -> bus_pb2.KvEventBatch:
    batch = bus_pb2.KvEventBatch(worker_id=worker_id, seq=seq)
    for ev in events:
        pb = batch.events.add(kind=_KIND_TO_PB[ev.kind], block_hashes=[h & HASH_MASK for h in ev.block_hashes],
                              block_size=ev.block_size)
        if ev.parent_hash is not None:
            pb.parent_hash = ev.parent_hash & HASH_MASK
        if ev.token_ids:
            pb.token_ids.extend(ev.token_ids)
        if ev.adapter_id is not None:
            pb.adapter_id = ev.adapter_id
    return batch


def kv_events_from_proto(batch: bus_pb2.KvEventBatch) -> list[KvEvent]:
    return [KvEvent(kind=_KIND_FROM_PB[pb.kind], block_hashes=list(pb.block_hashes),
                    parent_hash=pb.parent_hash if pb.HasField("parent_hash") else None,
                    token_ids=list(pb.token_ids) or None,
                    adapter_id=pb.adapter_id if pb.HasField("adapter_id") else None,
                    block_size=pb.block_size)
            for pb in batch.events]
