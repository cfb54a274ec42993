"""Generate the Python for protos/switchyard/v1/*.proto (what `make protos` runs).

Run from anywhere: `python -m protos.gen [--out DIR]`. Protos are compiled with the repo root as
the include path, so generated modules import each other as `from protos.switchyard.v1 import ...`.
The generated files are checked in; tests/e2e/test_protos_fresh.py regenerates into a temp dir and
fails when they differ (someone edited a .proto and forgot `make protos`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = Path("protos") / "switchyard" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    """The .proto files, relative to the repo root (sorted for a stable order)."""
    return sorted(p.relative_to(REPO_ROOT) for p in (REPO_ROOT / PROTO_DIR).glob("*.proto"))


def generate(out_dir: Path | None = None) -> list[Path]:
    """Compile every proto into out_dir (default: the repo root, i.e. beside the .proto files).

    Returns the generated file paths. Raises RuntimeError when protoc fails.
    """
    import grpc_tools
    from grpc_tools import protoc

    out = Path(out_dir) if out_dir is not None else REPO_ROOT
    out.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    files = [str(p) for p in proto_files()]
    args = ["grpc_tools.protoc", f"-I{REPO_ROOT}", f"-I{well_known}",
            f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *files]
    # protoc resolves relative file names against -I paths; run it relative to the repo root.
    import os
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)
    try:
        rc = protoc.main(args)
    finally:
        os.chdir(cwd)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    return sorted(p for p in (out / PROTO_DIR).iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="output root (default: the repo)")
    args = ap.parse_args(argv)
    for p in generate(args.out):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
