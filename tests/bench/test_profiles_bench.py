"""`switchyard bench profiles` pieces: the shared deployment it compares the profiles against is the
same catalogue with the model as one deployment (its profiles' replicas together, no profile engine
keys), written as TOML that parses back; the ratios are the issue's goals."""
from __future__ import annotations

import tomllib

from bench.profiles import DEFAULT_CATALOG, ratios, shared_catalog, to_toml
from common.catalog import load_catalog, parse_catalog


def test_the_shared_deployment_has_the_profiles_replicas_and_no_profile_engine_keys(tmp_path):
    data = tomllib.loads(DEFAULT_CATALOG.read_text())
    shared = shared_catalog(data, "smollm2")
    path = tmp_path / "shared.toml"
    path.write_text(to_toml(shared))
    cat = load_catalog(path)
    m = cat.get("smollm2")
    assert not m.profiles and (m.min_replicas, m.max_replicas) == (2, 2)
    assert m.engine == {} and cat.stack == data["stack"]
    assert [d.name for d in cat.deployments()] == ["smollm2"]
    # the original is untouched, and parses to its two profiles
    assert set(parse_catalog(data).get("smollm2").profiles) == {"online", "offline"}


def test_ratios_against_the_goals():
    prof = {"interactive": {"itl_ms": {"p99": 40.0}}, "batch": {"output_tok_s": 90.0}}
    shared = {"interactive": {"itl_ms": {"p99": 120.0}}, "batch": {"output_tok_s": 50.0}}
    r = ratios(prof, shared)
    assert r["online_itl_p99_shared_over_online"] == 3.0 and r["offline_tok_s_over_shared"] == 1.8
    assert ratios({**prof, "batch": {"output_tok_s": 0.0}}, shared)["offline_tok_s_over_shared"] is None
