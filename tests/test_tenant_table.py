"""Tenants (router/tenants.py): the table in the config, and who a caller is from its bearer token."""
from __future__ import annotations

import hashlib

import grpc
import pytest

from common.config import StackConfig, load_config, render_config
from router.tenants import DEFAULT_TENANT, AuthError, TenantTable, parse_bearer

ALPHA = "alpha-token-0123456789"
BETA = "beta-token-0123456789"
OLD = "old-beta-token-0123456789"
ADMIN = "admin-token-0123456789"


def cfg(auth: str = "required", **kw) -> StackConfig:
    return StackConfig(auth=auth, admin_tokens=[ADMIN], tenants={
        "alpha": {"tokens": [ALPHA], "weight": 2.0, "models": ["smollm2-135m"], "adapters": ["sql"],
                  "tokens_per_minute": 6000, "max_streams": 4, "priority_ceiling": 10},
        "beta": {"tokens": ["sha256:" + hashlib.sha256(BETA.encode()).hexdigest()], "revoked_tokens": [OLD],
                 "service_classes": ["batch"], "cert_subjects": ["CN=team-beta"]},
    }, **kw)


def test_a_token_names_its_tenant_plain_or_hashed_at_rest():
    t = TenantTable(cfg())
    assert t.resolve(f"Bearer {ALPHA}").name == "alpha"
    assert t.resolve(f"bearer   {BETA} ").name == "beta"
    assert t.resolve("", subject="CN=team-beta").name == "beta"
    alpha = t.by_name["alpha"]
    assert (alpha.weight, alpha.tokens_per_minute, alpha.max_streams) == (2.0, 6000, 4)
    assert t.by_name["beta"].service_class("interactive") == "batch"   # not allowed: its default
    assert alpha.service_class("batch") == "batch"


@pytest.mark.parametrize("raw, code, words", [
    ("", grpc.StatusCode.UNAUTHENTICATED, "missing credentials"),
    ("Basic abc:def", grpc.StatusCode.UNAUTHENTICATED, "malformed"),
    ("Bearer", grpc.StatusCode.UNAUTHENTICATED, "malformed"),
    ("Bearer short", grpc.StatusCode.UNAUTHENTICATED, "malformed bearer token"),
    ("Bearer unknown-token-0123456789", grpc.StatusCode.UNAUTHENTICATED, "unknown token"),
    (f"Bearer {OLD}", grpc.StatusCode.UNAUTHENTICATED, "revoked"),
    (f"Bearer {ADMIN}", grpc.StatusCode.PERMISSION_DENIED, "admin token"),
])
def test_auth_required_refuses_who_it_cannot_name_and_never_echoes_the_token(raw, code, words):
    with pytest.raises(AuthError) as e:
        TenantTable(cfg()).resolve(raw, service="switchyard.v1.Inference")
    assert e.value.code == code
    assert words in e.value.message
    token = raw.partition(" ")[2].strip()
    if token:
        assert token not in e.value.message


def test_admin_token_passes_the_admin_service_only():
    t = TenantTable(cfg())
    assert t.resolve(f"Bearer {ADMIN}", service="switchyard.v1.Admin") is None   # None: the admin role
    with pytest.raises(AuthError):
        t.resolve(f"Bearer {ADMIN}", service="switchyard.v1.Inference")


def test_auth_off_puts_unknown_callers_in_default_but_still_knows_tenant_tokens():
    t = TenantTable(cfg(auth="off"))
    assert t.resolve("").name == DEFAULT_TENANT
    assert t.resolve("Bearer unknown-token-0123456789").name == DEFAULT_TENANT
    assert t.resolve(f"Bearer {ALPHA}").name == "alpha"
    with pytest.raises(AuthError, match="revoked"):   # a revoked token is refused even with auth off
        t.resolve(f"Bearer {OLD}")
    assert DEFAULT_TENANT in t.names()


def test_permissions_models_adapters():
    alpha = TenantTable(cfg()).by_name["alpha"]
    assert alpha.may_use_model("smollm2-135m") and alpha.may_use_model("smollm2-135m@v2")
    assert not alpha.may_use_model("other")
    assert alpha.may_use_adapter("sql") and not alpha.may_use_adapter("beta-adapter")
    beta = TenantTable(cfg()).by_name["beta"]
    assert beta.may_use_model("anything") and beta.may_use_adapter("anything")


@pytest.mark.parametrize("tenants, words", [
    ({"bad name!": {"tokens": [ALPHA]}}, "tenant name"),
    ({"a": {"tokens": ["has space in it"]}}, "printable ASCII"),
    ({"a": {"tokens": ["sha256:abc"]}}, "64 hex"),
    ({"a": {"tokens": [ALPHA], "weight": 0}}, "weight must be > 0"),
    ({"a": {"tokens": [ALPHA], "max_streams": -1}}, "max_streams"),
    ({"a": {"tokens": [ALPHA], "service_classes": ["gold"]}}, "service_classes"),
    ({"a": {"tokens": [ALPHA], "default_class": "batch", "service_classes": ["interactive"]}}, "default_class"),
    ({"a": {"tokens": [ALPHA], "token": "typo"}}, "unknown keys"),
    ({"a": {"tokens": ALPHA}}, "list of strings"),
])
def test_bad_tenant_tables_are_refused_with_the_key_and_without_the_token(tenants, words):
    with pytest.raises(ValueError) as e:
        TenantTable(StackConfig(auth="required", tenants=tenants))
    assert words in str(e.value)
    assert "has space in it" not in str(e.value)


def test_auth_required_without_any_credential_is_a_config_error():
    with pytest.raises(ValueError, match="nobody could call"):
        TenantTable(StackConfig(auth="required"))
    with pytest.raises(ValueError, match="auth"):
        TenantTable(StackConfig(auth="maybe"))


def test_tenant_tables_round_trip_through_toml(tmp_path):
    c = cfg()
    p = tmp_path / "c.toml"
    p.write_text(render_config(c))
    back = load_config(p)
    assert back.tenants == c.tenants and back.auth == "required"


def test_parse_bearer():
    assert parse_bearer(f"Bearer {ALPHA}") == (ALPHA, "")
    assert parse_bearer("Bearer a b c d e f g h")[0] == ""


def test_the_pool_catalogue_carries_tenants_under_stack(tmp_path):
    from common.catalog import load_catalog
    from services.pool_setup import apply_stack_overrides
    p = tmp_path / "switchyard.toml"
    p.write_text(f"""
[stack]
auth = "required"
[stack.tenants.alpha]
tokens = ["{ALPHA}"]
weight = 3.0
max_streams = 2

[[models]]
name = "chat"
source = "smollm2-135m"
""")
    c = apply_stack_overrides(StackConfig(), load_catalog(p).stack)
    t = TenantTable(c)
    assert t.mode == "required" and t.resolve(f"Bearer {ALPHA}").weight == 3.0
    assert t.by_name["alpha"].max_streams == 2


def test_the_router_fills_the_batch_request_with_the_tenant_its_class_and_its_priority_ceiling():
    from protos.switchyard.v1 import bus_pb2
    from router.tenancy import Grant, Tenancy
    tenancy = Tenancy(cfg())
    alpha, beta = tenancy.table.by_name["alpha"], tenancy.table.by_name["beta"]
    breq = bus_pb2.BatchRequest(request_id="r1", priority=50)
    tenancy.fill(breq, Grant(tenancy, alpha, alpha.service_class("batch"), 0))
    assert (breq.tenant, breq.tenant_weight, breq.service_class, breq.priority) == ("alpha", 2.0, "batch", 10)
    breq = bus_pb2.BatchRequest(request_id="r2", priority=-5)
    tenancy.fill(breq, Grant(tenancy, beta, beta.service_class(""), 0))
    assert (breq.tenant, breq.tenant_weight, breq.service_class, breq.priority) == ("beta", 1.0, "batch", -5)
