"""`switchyard trace breakdown` on the recorded trace file: components add up to the measured TTFT."""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time

from protos.switchyard.v1 import inference_pb2_grpc
from telemetry import breakdown
from tests.e2e.conftest import channel, gen_request
from tests.telemetry.conftest import LONG_PROMPT

# Stated tolerance: the router-side TTFT (what the components add up to) lies inside the client's
# TTFT; the difference is the client <-> router gRPC hop, at most 10 ms + 15% on this shared box.
ABS_TOL_MS, REL_TOL = 10.0, 0.15
TOP_LEVEL = [c for c in breakdown.COMPONENTS if c not in breakdown.NESTED]


def test_breakdown_parts_add_up_to_measured_ttft(traced_stack):
    client_ttft: dict[str, float] = {}

    async def main():
        async with channel(traced_stack.router) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            for i in range(4):
                rid = f"bd-{i}"
                t0 = time.perf_counter()
                async for _ in stub.Generate(gen_request(LONG_PROMPT, max_tokens=3, request_id=rid), timeout=120):
                    client_ttft.setdefault(rid, 1000 * (time.perf_counter() - t0))
    asyncio.run(main())

    deadline = time.monotonic() + 15
    while True:   # batch span processors export every second
        rows = {r["request_id"]: r for r in breakdown.request_breakdowns(breakdown.load_spans(traced_stack.trace_file))}
        done = set(client_ttft) <= set(rows) and all(rows[r]["worker_steps"] >= 3 for r in client_ttft)
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert set(client_ttft) <= set(rows), f"missing traces: {set(client_ttft) - set(rows)}"
    for rid, measured in client_ttft.items():
        r = rows[rid]
        parts = sum(r["ttft"][c] for c in TOP_LEVEL)
        assert abs(parts - r["ttft_ms"]) < 1e-3, (rid, r)
        assert parts <= measured + 0.5, (rid, parts, measured)
        assert measured - parts <= ABS_TOL_MS + REL_TOL * measured, (rid, parts, measured, r["ttft"])
        assert all(r["ttft"][c] >= -0.5 for c in TOP_LEVEL), r["ttft"]
        assert abs(sum(r["e2e"][c] for c in TOP_LEVEL) - r["e2e_ms"]) < 1e-3
        assert 0 < r["ttft"]["worker_step"] <= r["ttft"]["prefill"] + 0.5   # nested in prefill
        assert r["ttft"]["kv_index"] > 0                                      # two workers: Match was asked

    # The CLI: table and --json over every trace in the file.
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert breakdown.main([str(traced_stack.trace_file), "--json"]) == 0
    report = json.loads(out.getvalue())
    assert report["traces"] >= 4
    shares = sum(report["components"][c]["share_ttft"] for c in TOP_LEVEL)
    assert abs(shares - 1.0) < 1e-6
    assert abs(sum(report["components"][c]["share_e2e"] for c in TOP_LEVEL) - 1.0) < 1e-6
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert breakdown.main([str(traced_stack.trace_file)]) == 0
    table = out.getvalue()
    for c in breakdown.COMPONENTS:
        assert c in table
