"""Per-tenant quotas that hold across router replicas (issue 17).

Shared state lives in a NATS JetStream KV bucket (`sy_quotas`), updated only with revision-checked
writes (`update(key, value, last=revision)`; a lost race re-reads and tries again), so two routers can
never both spend the same budget:

* rate (`rate.<tenant>`): one token bucket per tenant, {"a": tokens available, "t": when}; capacity
  tokens_per_minute, refilled at tokens_per_minute / 60 per second, refill computed by whoever writes.
  The hot path is a local bucket: a router leases budget from the shared bucket in chunks (LEASE_FRACTION
  of the capacity) and spends it without a round trip; only a miss goes to KV. Unused output tokens
  (reserved as max_tokens at admission) come back to the local bucket, and what a router holds beyond
  two chunks goes back to the shared one - so at most ~2 chunks per router are out of other routers' reach.
* streams and queued (`slots.<tenant>`): {router id: [open streams, queued, when]}; a router writes only
  its own entry (absolute counts), refreshes it every SLOT_REFRESH_S while non-zero, and entries older
  than SLOT_TTL_S (a router that died) are dropped by the next writer. Admission is one revision-checked
  write; releases are written behind the response (coalesced).

Without JetStream (or quota_shared = false) the same logic runs on MemoryKv: quotas per router process.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass

from common import subjects

log = logging.getLogger("switchyard.router.quotas")

BUCKET = subjects.QUOTAS_BUCKET
LEASE_FRACTION = 0.05      # a lease is 5% of the per-minute capacity (3 s of refill)
REFUSAL_CACHE_S = 0.05     # after the shared bucket said no, say no locally this long (no KV round trip)
SLOT_TTL_S = 15.0          # a router's slot entry older than this is a dead router's: dropped
SLOT_REFRESH_S = 3.0
SLOT_RETRY_MS = 500        # retry-after for a concurrency refusal (when a stream ends is unknown)
MAX_CAS_TRIES = 50


class Conflict(Exception):
    """A revision-checked write lost a race."""


class MemoryKv:
    """The KV operations the quotas use, in process memory (one router; tests of the logic)."""

    def __init__(self):
        self._d: dict[str, tuple[bytes, int]] = {}
        self._rev = 0

    async def get(self, key: str) -> tuple[bytes, int] | None:
        return self._d.get(key)

    async def create(self, key: str, value: bytes) -> int:
        if key in self._d:
            raise Conflict(key)
        self._rev += 1
        self._d[key] = (value, self._rev)
        return self._rev

    async def update(self, key: str, value: bytes, last: int) -> int:
        if key not in self._d or self._d[key][1] != last:
            raise Conflict(key)
        self._rev += 1
        self._d[key] = (value, self._rev)
        return self._rev


class JetStreamKv:
    """The same operations on a JetStream KV bucket."""

    def __init__(self, kv):
        self._kv = kv

    @classmethod
    async def open(cls, nc) -> "JetStreamKv":
        from nats.js.api import KeyValueConfig, StorageType
        from nats.js.errors import BucketNotFoundError
        js = nc.jetstream()
        try:
            kv = await js.key_value(BUCKET)
        except BucketNotFoundError:
            kv = await js.create_key_value(KeyValueConfig(bucket=BUCKET, history=1, storage=StorageType.MEMORY))
        return cls(kv)

    async def get(self, key: str) -> tuple[bytes, int] | None:
        from nats.js.errors import KeyNotFoundError
        try:
            e = await self._kv.get(key)
        except KeyNotFoundError:   # also KeyDeletedError
            return None
        return e.value or b"", e.revision

    async def create(self, key: str, value: bytes) -> int:
        from nats.js.errors import KeyValueError, KeyWrongLastSequenceError
        try:
            return await self._kv.create(key, value)
        except (KeyWrongLastSequenceError, KeyValueError) as e:
            raise Conflict(key) from e

    async def update(self, key: str, value: bytes, last: int) -> int:
        from nats.js.errors import KeyWrongLastSequenceError
        try:
            return await self._kv.update(key, value, last=last)
        except KeyWrongLastSequenceError as e:
            raise Conflict(key) from e


@dataclass
class Refusal:
    reason: str            # tokens_per_minute | max_streams | max_queued
    retry_after_ms: int
    message: str


class _Local:
    """One tenant's state on this router."""
    __slots__ = ("avail", "cap", "refused_until", "streams", "queued", "flush", "lock")

    def __init__(self):
        self.avail = 0.0          # leased rate budget held here
        self.cap = 0              # the tenant's tokens_per_minute (for giving the lease back)
        self.refused_until = 0.0
        self.streams = 0
        self.queued = 0
        self.flush: asyncio.Task | None = None
        self.lock = asyncio.Lock()   # one admission CAS at a time per tenant on this router


class Quotas:
    def __init__(self, kv=None, router_id: str = ""):
        self.kv = kv if kv is not None else MemoryKv()
        self.router_id = router_id or uuid.uuid4().hex[:12]
        self._local: dict[str, _Local] = {}
        self._refresh: asyncio.Task | None = None

    def local(self, tenant: str) -> _Local:
        s = self._local.get(tenant)
        if s is None:
            s = self._local[tenant] = _Local()
        return s

    # ---- rate ---------------------------------------------------------------------------------
    async def take_tokens(self, tenant: str, amount: int, per_minute: int) -> Refusal | None:
        """Spend `amount` tokens of the tenant's per-minute budget, or say when to retry."""
        s = self.local(tenant)
        s.cap = per_minute
        if s.avail >= amount:
            s.avail -= amount   # the common case: no await, no round trip
            return None
        now = time.time()
        rate = per_minute / 60.0
        if now < s.refused_until:
            return _rate_refusal(max(s.refused_until - now, (amount - s.avail) / rate), per_minute)
        need = amount - s.avail
        want = need + per_minute * LEASE_FRACTION
        granted, short = await self._lease(tenant, need, want, per_minute)
        if granted <= 0:
            wait = short / rate
            s.refused_until = time.time() + min(wait, REFUSAL_CACHE_S)
            return _rate_refusal(wait, per_minute)
        s.avail += granted - amount
        return None

    def refund(self, tenant: str, amount: float, per_minute: int) -> None:
        """Reserved tokens that were not used go back to the local bucket; a surplus over two leases goes
        back to the shared bucket (other routers may need it)."""
        if amount <= 0:
            return
        s = self.local(tenant)
        s.avail += amount
        keep = 2 * per_minute * LEASE_FRACTION
        if s.avail > keep:
            surplus, s.avail = s.avail - keep, keep
            _spawn(self._give_back(tenant, surplus, per_minute))

    async def _lease(self, tenant: str, need: float, want: float, cap: int) -> tuple[float, float]:
        """Take between need and want tokens from the shared bucket: (granted, 0) or (0, shortfall)."""
        key = f"rate.{tenant}"
        rate = cap / 60.0
        for _ in range(MAX_CAS_TRIES):
            now = time.time()
            cur = await self.kv.get(key)
            if cur is None:
                avail = float(cap)
            else:
                d = json.loads(cur[0] or b"{}")
                avail = min(float(cap), float(d.get("a", cap)) + rate * max(0.0, now - float(d.get("t", now))))
            if avail < need:
                return 0.0, need - avail
            granted = min(want, avail)
            value = json.dumps({"a": avail - granted, "t": now}).encode()
            try:
                if cur is None:
                    await self.kv.create(key, value)
                else:
                    await self.kv.update(key, value, cur[1])
                return granted, 0.0
            except Conflict:
                continue
        return 0.0, need   # contention beyond reason: refuse rather than overspend

    async def _give_back(self, tenant: str, amount: float, cap: int) -> None:
        key = f"rate.{tenant}"
        rate = cap / 60.0
        for _ in range(MAX_CAS_TRIES):
            cur = await self.kv.get(key)
            if cur is None:
                return   # a fresh bucket is full already
            now = time.time()
            d = json.loads(cur[0] or b"{}")
            avail = min(float(cap), float(d.get("a", cap)) + rate * max(0.0, now - float(d.get("t", now))) + amount)
            try:
                await self.kv.update(key, json.dumps({"a": avail, "t": now}).encode(), cur[1])
                return
            except Conflict:
                continue

    # ---- streams and queued -------------------------------------------------------------------------
    async def open_stream(self, tenant: str, max_streams: int, max_queued: int) -> Refusal | None:
        """Count one stream (and one queued request) for the tenant, unless over a limit across routers."""
        s = self.local(tenant)
        async with s.lock:
            key = f"slots.{tenant}"
            for _ in range(MAX_CAS_TRIES):
                cur = await self.kv.get(key)
                entries = self._live(cur)
                others = [v for r, v in entries.items() if r != self.router_id]
                streams = s.streams + sum(int(v[0]) for v in others)
                queued = s.queued + sum(int(v[1]) for v in others)
                if max_streams and streams + 1 > max_streams:
                    return Refusal("max_streams", SLOT_RETRY_MS,
                                   f"tenant {tenant!r} has {streams} streams open (limit max_streams={max_streams}); "
                                   f"retry after one finishes")
                if max_queued and queued + 1 > max_queued:
                    return Refusal("max_queued", SLOT_RETRY_MS,
                                   f"tenant {tenant!r} has {queued} requests waiting for a first token (limit "
                                   f"max_queued={max_queued}); retry later")
                entries[self.router_id] = [s.streams + 1, s.queued + 1, time.time()]
                try:
                    await self._write(key, cur, entries)
                except Conflict:
                    continue
                s.streams += 1
                s.queued += 1
                self._ensure_refresh()
                return None
        return Refusal("max_streams", SLOT_RETRY_MS, f"tenant {tenant!r}: quota state is contended; retry")

    def first_token(self, tenant: str) -> None:
        s = self.local(tenant)
        s.queued = max(0, s.queued - 1)
        self._schedule_flush(tenant)

    def close_stream(self, tenant: str, queued: bool) -> None:
        s = self.local(tenant)
        s.streams = max(0, s.streams - 1)
        if queued:
            s.queued = max(0, s.queued - 1)
        self._schedule_flush(tenant)

    def _live(self, cur) -> dict:
        if cur is None or not cur[0]:
            return {}
        now = time.time()
        return {r: v for r, v in json.loads(cur[0]).items() if r == self.router_id or now - float(v[2]) < SLOT_TTL_S}

    async def _write(self, key: str, cur, entries: dict) -> None:
        entries = {r: v for r, v in entries.items() if v[0] or v[1]}
        value = json.dumps(entries).encode()
        if cur is None:
            await self.kv.create(key, value)
        else:
            await self.kv.update(key, value, cur[1])

    def _schedule_flush(self, tenant: str) -> None:
        s = self.local(tenant)
        if s.flush is None or s.flush.done():
            s.flush = _spawn(self._flush(tenant))

    async def _flush(self, tenant: str) -> None:
        """Write this router's current counts for the tenant (coalesces releases that arrive meanwhile)."""
        s = self.local(tenant)
        async with s.lock:
            key = f"slots.{tenant}"
            for _ in range(MAX_CAS_TRIES):
                cur = await self.kv.get(key)
                entries = self._live(cur)
                entries[self.router_id] = [s.streams, s.queued, time.time()]
                try:
                    await self._write(key, cur, entries)
                    return
                except Conflict:
                    continue

    def _ensure_refresh(self) -> None:
        if self._refresh is None or self._refresh.done():
            self._refresh = _spawn(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        """Keep this router's non-zero slot entries fresh (a stale one is taken for a dead router's)."""
        while any(s.streams or s.queued for s in self._local.values()):
            await asyncio.sleep(SLOT_REFRESH_S)
            for tenant, s in list(self._local.items()):
                if s.streams or s.queued:
                    await self._flush(tenant)

    async def close(self) -> None:
        """Give leased budget back and clear this router's slot entries (best effort)."""
        if self._refresh is not None:
            self._refresh.cancel()
        for tenant, s in list(self._local.items()):
            s.streams = s.queued = 0
            leased, s.avail = s.avail, 0.0
            try:
                if leased > 0 and s.cap:
                    await asyncio.wait_for(self._give_back(tenant, leased, s.cap), 1.0)
                await asyncio.wait_for(self._flush(tenant), 1.0)
            except Exception as e:   # NATS gone: the entries expire after SLOT_TTL_S
                log.debug("quota flush on close: %r", e)

    def snapshot(self, tenant: str) -> dict:
        s = self._local.get(tenant)
        return {"streams": s.streams, "queued": s.queued, "leased": s.avail} if s else \
            {"streams": 0, "queued": 0, "leased": 0.0}


def _rate_refusal(wait_s: float, per_minute: int) -> Refusal:
    ms = max(1, int(wait_s * 1000) + 1)
    return Refusal("tokens_per_minute", ms, f"over the tenant's quota of {per_minute} tokens per minute "
                                            f"(prompt + max_tokens); retry in {ms} ms")


_BACKGROUND: set[asyncio.Task] = set()


def _spawn(coro) -> asyncio.Task:
    t = asyncio.get_running_loop().create_task(coro)
    _BACKGROUND.add(t)
    t.add_done_callback(_done)
    return t


def _done(t: asyncio.Task) -> None:
    _BACKGROUND.discard(t)
    if not t.cancelled() and t.exception() is not None:
        log.warning("quota state write failed: %r", t.exception())
