"""KV-cache management: the block allocator the batcher calls each step, chained block hashes,
KV events, and the global KV index the KV index service serves."""
from kv_manager.block_allocator import BlockAllocator
from kv_manager.block_hash import block_hashes, hash_block
from kv_manager.events import KvEvent
from kv_manager.index import KvIndex

__all__ = ["BlockAllocator", "KvEvent", "KvIndex", "block_hashes", "hash_block"]
