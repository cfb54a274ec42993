"""Unit tests: catalogue parsing, intent rules, scaler decisions, imbalance bound, admin auth."""
from __future__ import annotations

import re

import grpc
import pytest

from common.catalog import ScalerSpec, load_catalog, parse_catalog
from common.config import StackConfig
from router.admin_auth import check_admin
from router.catalog_routing import choose_bounded
from router.intent import RuleClassifier
from router.routing import Candidate
from router.validation import RequestError
from services.scaler import Scaler


def test_example_catalogue_loads():
    c = load_catalog("examples/pool.toml")
    assert c.names == ["smollm2", "tiny-coder"] and c.default_model == "smollm2"
    assert c.get("tiny-coder").source_for("v2") == "random:tiny"
    assert c.stack["admin_tokens"] == ["dev-admin-token"]


@pytest.mark.parametrize("bad", [
    {"models": [{"name": "a", "source": "x", "typo": 1}]},
    {"models": []},
    {"models": [{"name": "a", "source": "x"}, {"name": "a", "source": "y"}]},
    {"models": [{"name": "a", "source": "x", "min_replicas": 3, "max_replicas": 1}]},
    {"models": [{"name": "a", "source": "x", "memory_gb": 9}], "pool": {"slot_memory_gb": 1}},
    {"models": [{"name": "a", "source": "x"}], "pool": {"default_model": "b"}},
    {"models": [{"name": "a", "source": "x"}], "intents": [{"capability": "c", "regex": ["("]}]},
])
def test_bad_catalogues_are_errors(bad):
    with pytest.raises((ValueError, TypeError, re.error)):
        parse_catalog(bad)


def test_intent_rules():
    c = load_catalog("examples/pool.toml")
    r = RuleClassifier.from_catalog(c)
    assert r.classify("why does my Python function crash")[0] == "code"
    assert r.classify("def foo(x): return x")[0] == "code"
    assert r.classify("please SELECT the top customers")[0] == "sql"
    assert r.classify("tell me a story") == (None, "no intent rule matched")
    assert r.classify("tell me a story", hint="summarize")[0] == "summarize"
    assert r.classify("pythonic")[0] is None   # whole words only


def test_scaler_up_down_and_to_zero():
    s = Scaler(ScalerSpec(target_per_replica=2, scale_up_window_s=1.0, scale_down_window_s=5.0, idle_to_zero_s=20))
    assert s.observe("m", 7, 1, 0, 3, 0.0).target == 1          # desired 3, window not yet passed
    d = s.observe("m", 7, 1, 0, 3, 1.0)
    assert (d.desired, d.target) == (3, 3)
    assert s.observe("m", 100, 3, 0, 3, 2.0).desired == 3        # clamped to max
    assert s.observe("m", 0, 3, 0, 3, 3.0).target == 3           # below: window starts
    assert s.observe("m", 0, 3, 0, 3, 8.1).target == 2           # one at a time
    assert s.observe("m", 0, 2, 0, 3, 9.0).desired == 1          # idle < idle_to_zero: keep one warm
    d = s.observe("m", 0, 1, 0, 3, 2.0 + 20.0)
    assert (d.desired, d.target) == (0, 0)                       # idle long enough: to zero
    assert s.observe("k", 0, 1, 1, 3, 100.0).desired == 1        # min_replicas holds


def test_imbalance_bound():
    cands = [Candidate("a", matched_blocks=50, load=20), Candidate("b", matched_blocks=0, load=2)]
    assert choose_bounded(cands, 50, 1.0, 1.0, "kv", 100).worker_id == "a"   # locality wins unbounded
    assert choose_bounded(cands, 50, 1.0, 1.0, "kv", 8).worker_id == "b"     # but not past the bound


class _Ctx:
    def __init__(self, md):
        self.md = md

    def invocation_metadata(self):
        return self.md


@pytest.mark.parametrize("md,code", [
    ((), grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization", "Bearer nope"),), grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization", "Basic adm"),), grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization", "Bearer usr"),), grpc.StatusCode.PERMISSION_DENIED),
    ((("authorization", "Bearer adm"),), None),
])
def test_admin_auth(md, code):
    cfg = StackConfig(admin_tokens=["adm"], tokens=["usr"])
    if code is None:
        check_admin(_Ctx(md), cfg)
    else:
        with pytest.raises(RequestError) as e:
            check_admin(_Ctx(md), cfg)
        assert e.value.code == code


# ---- LoRA adapters in the catalogue ---------------------------------------------------------------
def _adapter_dir(tmp_path, name="ad"):
    d = tmp_path / name
    d.mkdir()
    (d / "adapter_config.json").write_text("{}")
    return d


def test_catalogue_adapters_parse_relative_to_the_file(tmp_path):
    _adapter_dir(tmp_path)
    (tmp_path / "c.toml").write_text('[[models]]\nname = "m"\nsource = "random:tiny"\ncapabilities = ["chat"]\n'
                                     '[[adapters]]\nname = "m-sql"\nbase = "m"\npath = "ad"\n'
                                     'capabilities = ["SQL", " "]\n')
    c = load_catalog(tmp_path / "c.toml")
    a = c.adapter("m-sql")
    assert (a.base, a.path, a.capabilities) == ("m", str((tmp_path / "ad").resolve()), ["sql"])
    assert RuleClassifier.from_catalog(c).classify("x", hint="sql")[0] == "sql"   # adapter capabilities count


@pytest.mark.parametrize("adapter,why", [
    ({"name": "x", "base": "nope", "path": "ad"}, "base 'nope'"),
    ({"name": "m", "base": "m", "path": "ad"}, "already a model"),
    ({"name": "x", "base": "m", "path": "missing"}, "not a PEFT adapter folder"),
    ({"name": "x", "base": "m"}, "path required"),
    ({"name": "x", "base": "m", "path": "ad", "rank": 8}, "unknown keys"),
])
def test_bad_catalogue_adapters(tmp_path, monkeypatch, adapter, why):
    _adapter_dir(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=why):
        parse_catalog({"models": [{"name": "m", "source": "x"}], "adapters": [adapter]})


class _Table:
    def __init__(self, served):
        self.served = served

    def models(self):
        return {s: [object()] for s in self.served}


def _pool_routing(catalog, served, adapters):
    from router.adapter_registry import AdapterEntry, AdapterRegistry
    from router.catalog_routing import PoolRouting
    pr = PoolRouting.__new__(PoolRouting)
    pr.catalog, pr.info = catalog, {}
    reg = AdapterRegistry()
    for a in adapters:
        reg.add(AdapterEntry(*a))
    pr.router = type("R", (), {"table": _Table(served), "adapters": reg})()
    return pr


def test_capability_routing_considers_adapters_at_their_base_price():
    cat = parse_catalog({"models": [
        {"name": "big", "source": "x", "capabilities": ["chat", "support"], "gpu_usd_per_hour": 3.0},
        {"name": "small", "source": "x", "capabilities": ["chat"], "gpu_usd_per_hour": 1.0},
        {"name": "cold", "source": "x", "capabilities": ["chat"], "gpu_usd_per_hour": 0.1}]})
    pr = _pool_routing(cat, ["big@v1", "small@v1"], [("small-support", "small", "/a", ["support"]),
                                                     ("big-chat", "big", "/b", ["chat"]),
                                                     ("small-chat", "small", "/c", ["chat"])])
    # only the adapter on the cheaper base has `support` at $1/h; the bare `big` costs $3/h
    model, why, adapter = pr._by_capability(["support"], 10)
    assert (model, adapter) == ("small", "small-support") and "adapter 'small-support' on small" in why
    # equal price: the adapter declared for the capability beats its bare base; `cold` is not ready
    assert pr._by_capability(["chat"], 10)[::2] == ("small", "small-chat")


def test_select_by_adapter_name_and_adapter_id():
    import asyncio

    from protos.switchyard.v1 import inference_pb2
    cat = parse_catalog({"models": [{"name": "m", "source": "x"}]})
    pr = _pool_routing(cat, ["m@v1"], [("m-sql", "m", "/a", ["sql"])])
    sel = asyncio.run(pr.select(inference_pb2.GenerateRequest(model="m-sql", prompt="x")))
    assert sel[0] == "m" and sel[2] == "m-sql"
    sel = asyncio.run(pr.select(inference_pb2.GenerateRequest(adapter_id="m-sql", prompt="x")))
    assert sel[0] == "m" and sel[2] == "m-sql"
    with pytest.raises(RequestError) as e:
        asyncio.run(pr.select(inference_pb2.GenerateRequest(model="nope", prompt="x")))
    assert e.value.code == grpc.StatusCode.NOT_FOUND and "m, m-sql" in e.value.message
