"""The model pool with real processes (one stack, tests in order; random:tiny models, tiny outputs).

Two models at once; routing by name, capability and intent; admin auth; hot-swap under traffic
and unload + on-demand load under traffic with zero failed requests; LRU eviction over the memory
budget; a burst raises desired replicas and the new replica takes traffic; idle scale-down.
"""
from __future__ import annotations

import asyncio
import time
import urllib.request

import grpc
import pytest

from protos.switchyard.v1 import inference_pb2, inference_pb2_grpc
from tests.e2e.conftest import channel
from tests.pool.conftest import ADMIN, USER, Traffic, admin_md, generate, request


def run(coro):
    return asyncio.run(coro)


async def models(router: str) -> dict:
    async with channel(router) as ch:
        resp = await inference_pb2_grpc.InferenceStub(ch).ListModels(inference_pb2.ListModelsRequest(), timeout=10)
    return {m.name: m for m in resp.models}


async def wait_for(router: str, pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        ms = await models(router)
        if pred(ms):
            return ms
        if time.monotonic() > deadline:
            seen = {n: (m.state, m.version, m.replicas, m.desired_replicas, m.queue_depth) for n, m in ms.items()}
            raise AssertionError(f"{what}: not within {timeout}s; models: {seen}")
        await asyncio.sleep(0.2)


async def until(pred, timeout: float, what: str):
    """Poll pred() (a condition on the test's own state, e.g. a Traffic's counters) until true."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.1)


async def admin(router: str, method: str, req, token: str = ADMIN, timeout: float = 180):
    async with channel(router) as ch:
        return await getattr(inference_pb2_grpc.AdminStub(ch), method)(req, metadata=admin_md(token), timeout=timeout)


def test_two_models_served_at_once(pool_stack, capsys):
    import json

    from services.cli import main as cli
    assert cli(["models", "--json", "--router", pool_stack.router]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert listed["alpha"]["state"] == "ready" and listed["gamma"]["state"] == "unloaded"
    assert cli(["status", "--router", pool_stack.router]) == 0
    text = capsys.readouterr().out
    assert "queue" in text and "alpha" in text and "gamma" in text

    async def main():
        ms = await models(pool_stack.router)
        assert (ms["alpha"].state, ms["beta"].state, ms["gamma"].state) == ("ready", "ready", "unloaded")
        assert list(ms["beta"].capabilities) == ["code", "sql"] and ms["alpha"].replicas == 1
        async with channel(pool_stack.router) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            a, b = await asyncio.gather(generate(stub, request(model="alpha")), generate(stub, request(model="beta")))
        assert (a["model"], b["model"]) == ("alpha", "beta")
        assert a["reason"] == "model named in the request" and a["worker"] != b["worker"]
        assert a["worker"] in ms["alpha"].workers and b["worker"] in ms["beta"].workers
    run(main())


def test_unknown_model_is_not_found_and_lists_names(pool_stack):
    async def main():
        async with channel(pool_stack.router) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await generate(inference_pb2_grpc.InferenceStub(ch), request(model="nope"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert "alpha, beta, gamma" in e.value.details()
    run(main())


def test_route_by_capability(pool_stack):
    async def main():
        async with channel(pool_stack.router) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            # gamma has `code` and is cheaper, but it is not loaded: the cheapest READY one wins.
            r = await generate(stub, request(capabilities=["code"]))
            assert r["model"] == "beta" and "cheapest ready" in r["reason"]
            assert (await generate(stub, request(capabilities=["chat"])))["model"] == "alpha"
            assert (await generate(stub, request(capabilities=["sql", "code"])))["model"] == "beta"
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await generate(stub, request(capabilities=["vision"]))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND and "capabilities served" in e.value.details()
    run(main())


def test_route_by_intent(pool_stack):
    async def main():
        async with channel(pool_stack.router) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            r = await generate(stub, request("there is a bug in my python script"))
            assert r["model"] == "beta" and "keyword 'python'" in r["reason"]
            r = await generate(stub, request("def add(a, b):"))
            assert r["model"] == "beta" and "regex" in r["reason"]
            r = await generate(stub, request("tell me about trains"))
            assert r["model"] == "alpha" and "default model" in r["reason"]
            r = await generate(stub, request("trains", intent="summarize"))
            assert r["model"] == "alpha" and "names a capability" in r["reason"]
    run(main())


def test_route_to_a_catalogue_adapter_by_name_capability_and_intent(pool_stack):
    async def main():
        async with channel(pool_stack.router) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            greedy = dict(prompt="hello there", max_tokens=8)

            def request(prompt="hello", max_tokens=4, **kw):   # greedy, so texts compare
                from protos.switchyard.v1 import common_pb2
                return inference_pb2.GenerateRequest(prompt=prompt, sampling=common_pb2.SamplingParams(
                    max_tokens=max_tokens, temperature=0.0), **kw)
            by_id = await generate(stub, request(model="alpha", adapter_id="alpha-support", **greedy))
            base = await generate(stub, request(model="alpha", **greedy))
            assert by_id["adapter"] == "alpha-support" and base["adapter"] == ""
            assert by_id["text"] != base["text"], "the adapter must change the output"
            r = await generate(stub, request(model="alpha-support", **greedy))
            assert (r["model"], r["adapter"], r["text"]) == ("alpha", "alpha-support", by_id["text"])
            r = await generate(stub, request(capabilities=["support"], **greedy))
            assert (r["model"], r["adapter"], r["text"]) == ("alpha", "alpha-support", by_id["text"])
            assert "adapter 'alpha-support' on alpha" in r["reason"]
            r = await generate(stub, request("my order is late", intent="support", max_tokens=2))
            assert (r["model"], r["adapter"]) == ("alpha", "alpha-support")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await generate(stub, request(model="beta", adapter_id="alpha-support"))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND   # beta's replicas do not serve it
    run(main())


def test_admin_auth(pool_stack):
    async def main():
        req = inference_pb2.UnloadModelRequest(name="gamma", wait=True)
        async with channel(pool_stack.router) as ch:
            stub = inference_pb2_grpc.AdminStub(ch)
            for md, code in [((), grpc.StatusCode.UNAUTHENTICATED),
                             (admin_md("wrong"), grpc.StatusCode.UNAUTHENTICATED),
                             (admin_md(USER), grpc.StatusCode.PERMISSION_DENIED)]:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.UnloadModel(req, metadata=md, timeout=10)
                assert e.value.code() == code, (md, e.value.details())
            resp = await stub.UnloadModel(req, metadata=admin_md(ADMIN), timeout=30)
            assert "not loaded" in resp.message
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.LoadModel(inference_pb2.LoadModelRequest(name="nope"), metadata=admin_md(), timeout=10)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
    run(main())


def test_hot_swap_under_traffic_fails_nothing(pool_stack):
    async def main():
        async with Traffic(pool_stack.router, n=3, model="beta") as t:
            await until(lambda: t.ok >= 3 or t.failures, 60, "traffic on v1")
            before = t.ok
            resp = await admin(pool_stack.router, "LoadModel",
                               inference_pb2.LoadModelRequest(name="beta", version="v2", wait=True))
            assert "swapped v1 -> v2" in resp.message
            n_at_swap = t.ok
            await until(lambda: t.versions["v2"] >= 3 or t.failures, 60, "traffic on v2")
        assert t.failures == [], t.failures[:5]
        assert before > 0 and t.ok > n_at_swap, (before, n_at_swap, t.ok)
        assert t.versions["v1"] > 0 and t.versions["v2"] > 0, t.versions
        ms = await models(pool_stack.router)
        assert ms["beta"].version == "v2" and ms["beta"].state == "ready"
        assert [r.version for r in ms["beta"].replica_info] == ["v2"]
    run(main())


def test_unload_and_on_demand_load_under_traffic(pool_stack):
    async def main():
        async with Traffic(pool_stack.router, n=2, model="alpha") as t:
            resp = await admin(pool_stack.router, "UnloadModel",
                               inference_pb2.UnloadModelRequest(name="beta", wait=True))
            assert "unloaded" in resp.message
            assert (await models(pool_stack.router))["beta"].state == "unloaded"
            # A request for an unloaded model loads it and waits instead of failing.
            async with channel(pool_stack.router) as ch:
                t0 = time.monotonic()
                r = await generate(inference_pb2_grpc.InferenceStub(ch), request(model="beta"), timeout=150)
                print(f"on-demand load + first token: {time.monotonic() - t0:.1f}s")
            assert r["model"] == "beta" and r["version"] == "v2"
        assert t.failures == [] and t.ok > 0, t.failures[:5]
        assert (await models(pool_stack.router))["beta"].state == "ready"
    run(main())


def test_lru_eviction_when_budget_exceeded(pool_stack):
    """Last use is stamped by heartbeats (0.5 s); the pool reports it as idle_s. Wait on that, not on
    the clock: until beta's last stamp has landed, then until alpha's new use has."""
    async def main():
        ms = await wait_for(pool_stack.router, lambda m: m["alpha"].state == m["beta"].state == "ready"
                            and m["beta"].queue_depth == 0 and m["beta"].idle_s > 2.0, 60, "beta idle")
        assert ms["gamma"].state == "unloaded"
        async with channel(pool_stack.router) as ch:
            await generate(inference_pb2_grpc.InferenceStub(ch), request(model="alpha"))
        # alpha is now the most recently used: both slots hold a 0.5 GB model and gamma needs a whole
        # 1 GB slot, so beta (least recently used, idle) must go
        await wait_for(pool_stack.router, lambda m: m["alpha"].idle_s < m["beta"].idle_s, 60, "alpha's use seen")
        resp = await admin(pool_stack.router, "LoadModel", inference_pb2.LoadModelRequest(name="gamma", wait=True))
        assert list(resp.evicted) == ["beta"], resp
        ms = await models(pool_stack.router)
        assert (ms["alpha"].state, ms["beta"].state, ms["gamma"].state) == ("ready", "unloaded", "ready")
    run(main())


def test_burst_scales_up_and_new_replica_takes_traffic(pool_stack):
    async def main():
        ms = await models(pool_stack.router)
        first = set(ms["alpha"].workers)
        async with Traffic(pool_stack.router, n=8, max_tokens=48, model="alpha") as t:
            t0 = time.monotonic()
            ms = await wait_for(pool_stack.router, lambda m: m["alpha"].desired_replicas == 2, 30, "desired 2")
            ms = await wait_for(pool_stack.router, lambda m: m["alpha"].replicas == 2, 150, "second alpha replica")
            new = set(ms["alpha"].workers) - first
            assert new
            # The pool's gauges follow within a scaler tick (0.25 s).
            want = ['switchyard_model_replicas_desired{model="alpha"} 2.0',
                    'switchyard_model_replicas{model="alpha",state="ready"} 2.0', "switchyard_model_queue_depth{"]
            for _ in range(20):
                url = f"http://{pool_stack.state['metrics']['pool']}/metrics"
                text = urllib.request.urlopen(url, timeout=5).read().decode()
                if all(w in text for w in want):
                    break
                await asyncio.sleep(0.25)
            assert all(w in text for w in want), [w for w in want if w not in text]
            print(f"burst -> second replica ready: {time.monotonic() - t0:.1f}s")
            deadline = time.monotonic() + 30
            while not any(t.workers[w] for w in new) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
        assert t.failures == [], t.failures[:5]
        assert any(t.workers[w] for w in new), t.workers
    run(main())


def test_idle_scale_down(pool_stack):
    """alpha back to min_replicas (1) after the 3 s scale-down window; gamma (min 0) to zero after 8 s
    idle - each seen to happen: the test starts from alpha at 2 replicas and gamma loaded (as the burst
    and LRU tests leave them; when run alone it scales alpha up and loads gamma itself), then sends
    nothing and waits."""
    async def main():
        if (await models(pool_stack.router))["alpha"].replicas < 2:
            resp = await admin(pool_stack.router, "LoadModel",
                               inference_pb2.LoadModelRequest(name="alpha", replicas=2, wait=True))
            assert "scaled to 2" in resp.message or "already loaded (2" in resp.message, resp.message
        await wait_for(pool_stack.router, lambda m: m["alpha"].replicas == 1 and m["alpha"].desired_replicas == 1,
                       60, "alpha scaled down to 1")
        if (await models(pool_stack.router))["gamma"].state != "ready":
            resp = await admin(pool_stack.router, "LoadModel", inference_pb2.LoadModelRequest(name="gamma", wait=True))
            assert "loaded" in resp.message, resp.message
        await wait_for(pool_stack.router, lambda m: m["gamma"].state == "unloaded", 60, "gamma scaled to zero")
        assert (await models(pool_stack.router))["alpha"].replicas == 1      # min_replicas holds
    run(main())
