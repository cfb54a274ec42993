"""Unit tests: catalogue parsing, intent rules, scaler decisions, imbalance bound, admin auth."""
from __future__ import annotations

import re

import grpc
import pytest

from router.admin_auth import check_admin
from router.catalog_routing import choose_bounded
from router.intent import RuleClassifier
from router.routing import Candidate
from router.validation import RequestError
from services.catalog import ScalerSpec, load_catalog, parse_catalog
from services.config import StackConfig
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
