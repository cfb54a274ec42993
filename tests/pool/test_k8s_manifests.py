"""deploy/k8s/: a schema check of the fields we use (PyYAML; no cluster, no kubectl).

Every service has a Deployment; every catalogue model has a Deployment whose pod runs a worker and
its batcher, and a KEDA ScaledObject scaling that Deployment on the model's queue depth.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


def docs() -> list[dict]:
    out = []
    for f in sorted(K8S.glob("*.yaml")):
        if f.name == "kustomization.yaml":
            continue
        for d in yaml.safe_load_all(f.read_text()):
            if d:
                d["__file"] = f.name
                out.append(d)
    return out


def by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs() if d.get("kind") == kind}


def _req(d: dict, path: str, typ=None):
    cur = d
    for k in path.split("."):
        assert isinstance(cur, dict) and k in cur, f"{d.get('__file')}: {d.get('kind')} missing {path}"
        cur = cur[k]
    if typ is not None:
        assert isinstance(cur, typ), f"{d.get('__file')}: {path} should be {typ.__name__}, got {cur!r}"
    return cur


def test_every_document_has_kind_api_and_name():
    for d in docs():
        _req(d, "apiVersion", str)
        _req(d, "kind", str)
        _req(d, "metadata.name", str)
        if d["kind"] != "Namespace":
            assert _req(d, "metadata.namespace", str) == "switchyard"


def test_deployments():
    deps = by_kind("Deployment")
    assert {"nats", "kv-manager", "router", "model-smollm2", "model-tiny-coder"} <= set(deps)
    for name, d in deps.items():
        assert d["apiVersion"] == "apps/v1"
        sel = _req(d, "spec.selector.matchLabels", dict)
        labels = _req(d, "spec.template.metadata.labels", dict)
        assert sel.items() <= labels.items(), f"{name}: selector does not match the pod labels"
        _req(d, "spec.replicas", int)
        containers = _req(d, "spec.template.spec.containers", list)
        volumes = {v["name"] for v in d["spec"]["template"]["spec"].get("volumes", [])}
        for c in containers:
            _req(c, "name", str)
            _req(c, "image", str)
            for p in c.get("ports", []):
                assert isinstance(p["containerPort"], int)
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{name}/{c['name']}: mount {m['name']} has no volume"
    for model in ("smollm2", "tiny-coder"):
        names = {c["name"] for c in deps[f"model-{model}"]["spec"]["template"]["spec"]["containers"]}
        assert names == {"worker", "batcher"}


def test_services_select_deployments():
    deps = by_kind("Deployment")
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in deps.values()]
    for name, s in by_kind("Service").items():
        sel = _req(s, "spec.selector", dict)
        assert any(sel.items() <= p.items() for p in pods), f"service {name} selects no pod"
        for p in _req(s, "spec.ports", list):
            assert isinstance(p["port"], int)


def test_keda_scaled_object_per_catalogue_model():
    cm = by_kind("ConfigMap")["switchyard-config"]
    catalog = tomllib.loads(cm["data"]["switchyard.toml"])
    deps = by_kind("Deployment")
    sos = by_kind("ScaledObject")
    for m in catalog["models"]:
        so = sos[f"model-{m['name']}"]
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        ref = _req(so, "spec.scaleTargetRef", dict)
        assert ref["kind"] == "Deployment" and ref["name"] in deps
        lo, hi = _req(so, "spec.minReplicaCount", int), _req(so, "spec.maxReplicaCount", int)
        assert (lo, hi) == (m["min_replicas"], m["max_replicas"])
        trig = _req(so, "spec.triggers", list)
        assert trig and all(t["type"] in ("prometheus", "nats-jetstream") for t in trig)
        for t in trig:
            md = t["metadata"]
            assert isinstance(md["threshold"], str) and float(md["threshold"]) > 0   # KEDA wants strings
            if t["type"] == "prometheus":
                assert "switchyard_requests_waiting" in md["query"] and f"model-{m['name']}-" in md["query"]
                assert md["serverAddress"].startswith("http")


def test_kustomization_lists_every_file():
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(k["resources"]) == sorted(f.name for f in K8S.glob("*.yaml") if f.name != "kustomization.yaml")
