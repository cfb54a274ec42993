"""The checked-in generated protobuf Python must match what `make protos` produces now."""
from pathlib import Path

from protos import gen


def test_generated_protos_are_fresh(tmp_path: Path):
    fresh = gen.generate(tmp_path)
    assert fresh, "protoc produced nothing"
    stale = []
    for f in fresh:
        checked_in = gen.REPO_ROOT / f.relative_to(tmp_path)
        if not checked_in.exists() or checked_in.read_bytes() != f.read_bytes():
            stale.append(str(checked_in.relative_to(gen.REPO_ROOT)))
    assert not stale, f"generated protobuf code is stale, run `make protos`: {stale}"


def test_generated_imports_resolve_from_repo_root():
    from protos.switchyard.v1 import bus_pb2, inference_pb2_grpc, kv_index_pb2_grpc, worker_pb2_grpc  # noqa: F401
    assert inference_pb2_grpc.InferenceStub and worker_pb2_grpc.WorkerStub and kv_index_pb2_grpc.KvIndexStub
