"""Deployment profiles (issue 19 item 4): one model served by an `online` and an `offline` deployment.
Catalogue parsing (bad names and keys are errors naming the place), the deployments the pool runs,
and the router's choice of deployment by service class or by name."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from common.catalog import load_catalog, parse_catalog
from common.config import StackConfig
from protos.switchyard.v1 import inference_pb2
from router.catalog_routing import pick_profile
from router.validation import RequestError
from services.pool import replica_config
from tests.pool.test_pool_units import _pool_routing


def _model(**kw) -> dict:
    return {"name": "m", "source": "random:tiny", **kw}


TWO = {"online": {"min_replicas": 1, "engine": {"max_num_seqs": 4, "max_num_batched_tokens": 32}},
       "offline": {"max_replicas": 2, "engine": {"max_num_seqs": 64, "max_num_batched_tokens": 1024}}}


def test_example_profiles_catalogue_runs_one_deployment_per_profile():
    c = load_catalog("examples/profiles.toml")
    m = c.get("smollm2")
    assert list(m.profiles) == ["online", "offline"] and m.default_profile == "online"
    assert m.profiles["online"].service_classes == ["interactive"]
    assert m.profiles["offline"].service_classes == ["batch"]
    deps = {d.name: d for d in c.deployments()}
    assert sorted(deps) == ["smollm2:offline", "smollm2:online"]
    assert deps["smollm2:online"].engine["max_num_batched_tokens"] == 64
    assert deps["smollm2:offline"].engine["max_num_seqs"] == 64
    assert c.deployment_names("smollm2") == ["smollm2:online", "smollm2:offline"]


def test_a_profile_inherits_the_models_settings_and_overrides_its_engine_keys():
    c = parse_catalog({"models": [_model(min_replicas=0, max_replicas=3, memory_gb=0.25,
                                         engine={"max_num_seqs": 16, "block_size": 8}, profiles=TWO)]})
    on, off = c.deployment("m:online"), c.deployment("m:offline")
    assert (on.min_replicas, on.max_replicas, on.memory_gb) == (1, 3, 0.25)
    assert (off.min_replicas, off.max_replicas) == (0, 2)
    assert on.engine == {"max_num_seqs": 4, "block_size": 8, "max_num_batched_tokens": 32}
    assert off.engine == {"max_num_seqs": 64, "block_size": 8, "max_num_batched_tokens": 1024}
    # a replica of each runs its profile's engine keys; the model's adapters stay its own
    cfg = replica_config(StackConfig(), c, on, on.source)
    assert (cfg.engine.max_num_seqs, cfg.engine.max_num_batched_tokens, cfg.engine.block_size) == (4, 32, 8)
    # the bare name of a model with profiles is no deployment; nor is a profile it lacks
    assert c.deployment("m") is None and c.deployment("m:nope") is None
    plain = parse_catalog({"models": [_model()]})
    assert plain.deployment("m").name == "m" and plain.deployment("m:online") is None


@pytest.mark.parametrize("profiles, default, why", [
    ({"on line": {}}, "", r"profiles\.on line: profile names use"),
    ({"online": {"typo": 1}}, "", r"profiles\.online: unknown keys \['typo'\]"),
    ({"online": {"engine": {"max_num_seqz": 4}}}, "", r"profiles\.online\.engine: unknown engine keys"),
    ({"online": {"service_classes": ["realtime"]}}, "", r"service_classes \['realtime'\]: choose from"),
    ({"a": {"service_classes": ["batch"]}, "b": {"service_classes": ["batch"]}}, "",
     "service class 'batch' is served by both profiles 'a' and 'b'"),
    ({"online": {"min_replicas": 3, "max_replicas": 1}}, "", r"profiles\.online: need 0 <= min_replicas"),
    (TWO, "fast", "default_profile 'fast' is not one of its profiles"),
    ({}, "online", "default_profile 'online' but no"),
    ("online", "", "profiles: a table of profile name"),
])
def test_bad_profiles_are_errors_that_name_the_place(profiles, default, why):
    with pytest.raises(ValueError, match=why):
        parse_catalog({"models": [_model(profiles=profiles, default_profile=default)]})


def test_a_profile_larger_than_a_slot_is_an_error():
    with pytest.raises(ValueError, match="m:big: memory_gb 4"):
        parse_catalog({"models": [_model(profiles={"big": {"memory_gb": 4}})], "pool": {"slot_memory_gb": 1}})


def test_profile_by_service_class_default_and_name():
    c = parse_catalog({"models": [_model(profiles=TWO), {"name": "plain", "source": "x"}]})
    assert pick_profile(c, "m", "interactive")[0] == "m:online"
    name, why = pick_profile(c, "m", "batch")
    assert name == "m:offline" and "serves service class 'batch'" in why
    name, why = pick_profile(c, "m", "")
    assert name == "m:online" and "default" in why
    assert pick_profile(c, "m@v2", "batch")[0] == "m:offline@v2"        # a version asked for is kept
    assert pick_profile(c, "m:offline", "interactive") == ("m:offline", "profile 'offline' named in the request")
    assert pick_profile(c, "plain", "batch") == ("plain", "")            # no profiles: as is
    assert pick_profile(c, "elsewhere@v1", "batch") == ("elsewhere@v1", "")
    for name, listed in (("m:fast", "online, offline"), ("plain:online", "none")):
        with pytest.raises(RequestError) as e:
            pick_profile(c, name, "")
        assert e.value.code == grpc.StatusCode.NOT_FOUND and e.value.field == "model"
        assert "has no deployment profile" in e.value.message and listed in e.value.message.replace(
            "offline, online", "online, offline")


def test_an_offline_only_model_sends_interactive_requests_to_its_default():
    c = parse_catalog({"models": [_model(profiles={"offline": {}, "spare": {}})]})
    assert c.get("m").default_profile == "offline"
    assert pick_profile(c, "m", "interactive") == ("m:offline", "profile 'offline' (no profile serves service "
                                                                "class 'interactive': the model's default)")


def test_select_and_readiness_see_a_model_through_its_profiles():
    c = parse_catalog({"models": [_model(capabilities=["chat"], profiles=TWO)]})
    pr = _pool_routing(c, ["m:offline@v1"], [])
    assert pr.is_ready("m") and pr.is_ready("m:offline") and not pr.is_ready("m:online")
    assert pr.served_names("m:offline") == ["m:offline@v1"]
    for model in ("m", "m:online", "m:offline@v1"):
        sel = asyncio.run(pr.select(inference_pb2.GenerateRequest(model=model, prompt="x")))
        assert sel == (model, "model named in the request", "")
    name, why, _ = pr._by_capability(["chat"], 10)
    assert name == "m" and "cheapest ready model" in why
