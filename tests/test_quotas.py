"""Quotas (router/quotas.py) on a real nats-server's JetStream KV: two Quotas objects are two routers."""
from __future__ import annotations

import asyncio
import time

import pytest

from router import quotas as q
from router.quotas import JetStreamKv, MemoryKv, Quotas


@pytest.fixture
def nats_url(tmp_path):
    from common.ports import free_port
    from common.proc import stop_all
    from services import nats_server
    port = free_port()
    child = nats_server.start("127.0.0.1", port, tmp_path, 1 << 20, tmp_path)
    yield f"nats://127.0.0.1:{port}"
    stop_all([child], 10)


async def _routers(url: str, n: int = 2):
    import nats
    ncs = [await nats.connect(url) for _ in range(n)]
    return ncs, [Quotas(await JetStreamKv.open(nc), router_id=f"r{i}") for i, nc in enumerate(ncs)]


def test_rate_quota_is_shared_by_two_routers(nats_url):
    async def main():
        ncs, (a, b) = await _routers(nats_url)
        try:
            # 1200 tokens a minute (20/s): each router leases from the one shared bucket.
            spent = 0
            for i in range(40):
                router = a if i % 2 else b
                r = await router.take_tokens("t", 50, 1200)
                if r is not None:
                    break
                spent += 50
            # Both together got the bucket once (plus a little refill), not twice; what the other router
            # still holds of its last lease (at most one lease) is the only budget not spent.
            lease = 1200 * q.LEASE_FRACTION
            assert 1200 - 2 * lease <= spent <= 1200 + 200, spent
            assert r.reason == "tokens_per_minute" and r.retry_after_ms > 0
            # Refused locally within the refusal cache: no round trip, and the retry hint still holds.
            t0 = time.perf_counter()
            r2 = await router.take_tokens("t", 50, 1200)
            assert r2 is not None and (time.perf_counter() - t0) < 0.01
            # Another tenant does not notice.
            assert await a.take_tokens("other", 50, 1200) is None
            # After the hinted wait the tenant is served again (by the router that gave the hint).
            await asyncio.sleep(max(r.retry_after_ms, r2.retry_after_ms) / 1000 + 0.1)
            assert await router.take_tokens("t", 50, 1200) is None
        finally:
            for nc in ncs:
                await nc.close()
    asyncio.run(main())


def test_concurrency_quota_holds_across_routers_under_concurrent_admission(nats_url):
    async def main():
        ncs, (a, b) = await _routers(nats_url)
        try:
            results = await asyncio.gather(*[(a if i % 2 else b).open_stream("t", 3, 0) for i in range(10)])
            admitted = [r for r in results if r is None]
            assert len(admitted) == 3   # revision-checked writes: never more than the limit
            refused = [r for r in results if r is not None]
            assert all(r.reason == "max_streams" and r.retry_after_ms > 0 for r in refused)
            # A stream closing on one router frees a slot for the other.
            owner = a if a.local("t").streams else b
            other = b if owner is a else a
            owner.close_stream("t", queued=True)
            await asyncio.sleep(0.2)   # the release is written behind the response
            assert await other.open_stream("t", 3, 0) is None
            assert await other.open_stream("t", 3, 0) is not None
        finally:
            for nc in ncs:
                await nc.close()
    asyncio.run(main())


def test_queued_quota_counts_requests_until_their_first_token(nats_url):
    async def main():
        ncs, (a, b) = await _routers(nats_url)
        try:
            assert await a.open_stream("t", 0, 2) is None
            assert await b.open_stream("t", 0, 2) is None
            r = await a.open_stream("t", 0, 2)
            assert r is not None and r.reason == "max_queued"
            b.first_token("t")   # still streaming, no longer queued
            await asyncio.sleep(0.2)
            assert await a.open_stream("t", 0, 2) is None
        finally:
            for nc in ncs:
                await nc.close()
    asyncio.run(main())


def test_a_dead_routers_slots_expire(nats_url, monkeypatch):
    async def main():
        ncs, (a, b) = await _routers(nats_url)
        try:
            assert await a.open_stream("t", 1, 0) is None
            assert await b.open_stream("t", 1, 0) is not None
            a._refresh.cancel()   # router a "dies": its entry is no longer refreshed
            monkeypatch.setattr(q, "SLOT_TTL_S", 0.3)
            await asyncio.sleep(0.5)
            assert await b.open_stream("t", 1, 0) is None
        finally:
            for nc in ncs:
                await nc.close()
    asyncio.run(main())


def test_refunds_come_back_and_surplus_returns_to_the_shared_bucket():
    async def main():
        kv = MemoryKv()
        a, b = Quotas(kv, "a"), Quotas(kv, "b")
        assert await a.take_tokens("t", 600, 1200) is None    # a holds a lease
        a.refund("t", 600, 1200)                               # unused: surplus goes back to KV
        await asyncio.sleep(0.05)
        assert a.local("t").avail <= 2 * 1200 * q.LEASE_FRACTION + 1e-6
        assert await b.take_tokens("t", 1000, 1200) is None    # b can use what a gave back
    asyncio.run(main())
