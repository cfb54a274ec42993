"""Defaults chosen from the machine through a real stack (issue 19 item 6): `switchyard up` with
`auto_tune = true` and num_threads, the token budget and the admission window left unset. Worker 0
measures them at start; the batcher runs with the chosen budget and window; stack.json and
`switchyard status` say what was chosen and why; the stack answers as usual. A budget set in the
config is kept."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from protos.switchyard.v1 import inference_pb2_grpc
from tests.e2e.conftest import REPO, channel, collect, gen_request, start_stack


def test_switchyard_up_measures_threads_budget_and_window(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    h = start_stack(tmp_path / "tuned", auto_tune=True, tune_step_target_ms=60.0)
    try:
        t = h.state["tuning"]
        assert t is not None and t["num_threads"] >= 1 and t["admission_window_ms"] >= 1.0
        assert t["max_num_batched_tokens"] % 16 == 0 and t["max_num_batched_tokens"] >= 16
        assert set(t["reasons"]) == {"num_threads", "max_num_batched_tokens", "admission_window_ms"}
        assert t["measured"] and t["measured"][0]["decode_ms"] > 0
        batcher_cfg = json.loads((tmp_path / "tuned" / "stack-config-tuned.json").read_text())
        assert batcher_cfg["engine"]["max_num_batched_tokens"] == t["max_num_batched_tokens"]
        assert batcher_cfg["admission_window_ms"] == t["admission_window_ms"]

        async def main():
            async with channel(h.router) as ch:
                return await collect(inference_pb2_grpc.InferenceStub(ch), gen_request("The capital of France is", 6))
        _, ids, _ = asyncio.run(main())
        assert len(ids) == 6
        out = subprocess.run([sys.executable, "-m", "services.cli", "status", "--router", h.router], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "defaults chosen from the machine" in out.stdout
        assert f"max_num_batched_tokens = {t['max_num_batched_tokens']}:" in out.stdout
    finally:
        assert not h.stop()


def test_a_budget_set_in_the_config_is_kept(tmp_path):
    h = start_stack(tmp_path / "kept", auto_tune=True, engine={"num_threads": 1, "max_num_batched_tokens": 256})
    try:
        t = h.state["tuning"]
        assert t["num_threads"] is None and t["max_num_batched_tokens"] is None   # both set: not the tuner's
        assert t["admission_window_ms"] is not None
        batcher_cfg = json.loads((tmp_path / "kept" / "stack-config-tuned.json").read_text())
        assert batcher_cfg["engine"]["max_num_batched_tokens"] == 256
        assert batcher_cfg["engine"]["num_threads"] == 1
    finally:
        assert not h.stop()
