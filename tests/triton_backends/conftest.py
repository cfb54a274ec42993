"""Stacks for the Triton tests: B (our engine, Triton-protocol front door on --triton-port) and
A (a pass-through worker whose Triton backend points at B's front door). Real processes."""
from __future__ import annotations

import pytest

from tests.e2e.conftest import start_stack

MODEL = "smollm2-135m"
SMALL = dict(num_kv_blocks=256, max_model_len=512, max_num_seqs=8, max_waiting=16, drain_grace_s=2.0)


@pytest.fixture(scope="session")
def stack_b(tmp_path_factory):
    h = start_stack(tmp_path_factory.mktemp("triton_b"), workers=1, triton_port=0, **SMALL)
    yield h
    h.stop(30)


@pytest.fixture(scope="session")
def stack_a(tmp_path_factory, stack_b):
    h = start_stack(tmp_path_factory.mktemp("triton_a"), workers=1, backend="triton",
                    backend_url=stack_b.state["triton"], backend_model=MODEL, backend_max_concurrency=4,
                    triton_port=0, **SMALL)
    yield h
    h.stop(30)


@pytest.fixture(scope="session")
def tclient(stack_b):
    from workers.backends.tritongrpc import load
    tg = load()[0]
    c = tg.InferenceServerClient(stack_b.state["triton"])
    yield c
    c.close()
