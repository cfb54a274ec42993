"""Chained KV block hashes, shared by the router and the batcher.

A block's hash covers its parent's hash, the adapter id and the block's token ids,
so equal hashes mean "the same tokens after the same prefix under the same
adapter". Hashes are 64-bit unsigned ints from ``blake2b(digest_size=8)`` over a
fixed, explicit byte encoding, so they are stable across processes, machines
and Python runs (no ``hash()``, which is randomised per process).

Encoding of one block (all integers little-endian)::

    parent:  b"\\x00"                       if parent_hash is None
             b"\\x01" + uint64(parent_hash)  otherwise
    adapter: b"\\x00"                       if adapter_id is None
             b"\\x01" + uint32(len(utf8)) + utf8
    tokens:  int64 * len(token_ids)

Changing this encoding changes every hash: the KV index and all workers' caches
would have to be flushed, so tests pin a known value.
"""

from __future__ import annotations

import sys
from array import array
from hashlib import blake2b
from typing import Sequence

__all__ = ["hash_block", "block_hashes", "HASH_MASK"]

HASH_MASK = (1 << 64) - 1
_BIG_ENDIAN = sys.byteorder == "big"
_NO_PARENT = b"\x00"
_NO_ADAPTER = b"\x00"


def _parent_bytes(parent_hash: int | None) -> bytes:
    if parent_hash is None:
        return _NO_PARENT
    return b"\x01" + (parent_hash & HASH_MASK).to_bytes(8, "little")


def _adapter_bytes(adapter_id: str | None) -> bytes:
    if adapter_id is None:
        return _NO_ADAPTER
    raw = adapter_id.encode("utf-8")
    return b"\x01" + len(raw).to_bytes(4, "little") + raw


def _tokens_bytes(token_ids: Sequence[int]) -> bytes | memoryview:
    arr = array("q", token_ids)
    if _BIG_ENDIAN:  # pragma: no cover - all our targets are little-endian
        arr.byteswap()
    return memoryview(arr).cast("B")


def hash_block(
    parent_hash: int | None,
    token_ids: Sequence[int],
    adapter_id: str | None = None,
) -> int:
    """Hash of one block: (parent hash, adapter id, token ids) -> uint64."""
    h = blake2b(_parent_bytes(parent_hash), digest_size=8)
    h.update(_adapter_bytes(adapter_id))
    h.update(_tokens_bytes(token_ids))
    return int.from_bytes(h.digest(), "little")


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    adapter_id: str | None = None,
    parent_hash: int | None = None,
) -> list[int]:
    """Chained hashes of the FULL blocks of ``token_ids`` (a partial tail is not hashed).

    ``parent_hash`` is the hash of the block before ``token_ids[0]`` (None at the
    start of a sequence); pass the last hash returned to continue a chain.
    ``block_hashes(t, bs)[i] == hash_block(block_hashes(t, bs)[i-1], t[i*bs:(i+1)*bs])``.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    n_full = len(token_ids) // block_size
    if n_full == 0:
        return []
    # Pack all full blocks once; slice the bytes per block (no per-token Python work).
    arr = array("q", token_ids[: n_full * block_size])
    if _BIG_ENDIAN:  # pragma: no cover
        arr.byteswap()
    mv = memoryview(arr).cast("B")
    stride = block_size * 8
    adapter = _adapter_bytes(adapter_id)
    from_bytes = int.from_bytes
    out: list[int] = []
    parent = parent_hash
    for i in range(n_full):
        h = blake2b(_parent_bytes(parent), digest_size=8)
        h.update(adapter)
        h.update(mv[i * stride : (i + 1) * stride])
        parent = from_bytes(h.digest(), "little")
        out.append(parent)
    return out
