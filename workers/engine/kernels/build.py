"""Compile and load the native CPU kernels as torch ops, torch.ops.switchyard.*: block_linear.cpp
(GGUF block matmuls) and decode_ops.cpp (fused residual-add + RMSNorm, paged decode attention,
the LoRA deltas of a decode batch).

They are built once per machine, torch version and source (`make install` runs
`python -m workers.engine.kernels.build`; otherwise the first engine on CPU builds them, ~15 s)
into ~/.cache/switchyard/kernels (SWITCHYARD_KERNEL_DIR overrides). `-march=native` is the
point: the block kernels are AVX-512/AVX2 code. Without a C++ compiler, or when the build fails,
`load()` returns False once with a warning and the engine runs plain torch ops.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path

log = logging.getLogger("switchyard.kernels")

SOURCES = [Path(__file__).with_name(n) for n in ("block_linear.cpp", "decode_ops.cpp")]
DIR_ENV = "SWITCHYARD_KERNEL_DIR"
_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-w"]

_lock = threading.Lock()
_state: bool | None = None     # None: not tried yet; then whether the ops are loaded


def _torch_paths():
    import torch
    root = Path(torch.__file__).parent
    return root, [root / "include", root / "include" / "torch" / "csrc" / "api" / "include"], root / "lib"


def library_path() -> Path:
    """Where this source, torch version and machine's build lives."""
    import torch
    key = hashlib.sha256()
    for src in SOURCES:
        key.update(src.read_bytes())
    key.update(f"{torch.__version__}|{sys.version_info[:2]}|{platform.machine()}|{' '.join(_FLAGS)}".encode())
    try:   # -march=native: a different CPU needs its own build
        key.update(Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].encode())
    except (OSError, IndexError):
        pass
    root = Path(os.environ.get(DIR_ENV) or Path.home() / ".cache" / "switchyard" / "kernels").expanduser()
    return root / key.hexdigest()[:16] / "switchyard_cpu.so"


def build(force: bool = False) -> Path:
    """Compile into the cache (atomically: concurrent builders each write a temp file, one rename wins)."""
    import torch
    out = library_path()
    if out.exists() and not force:
        return out
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    root, includes, libdir = _torch_paths()
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp = out.with_name(f".{out.name}.{tag}")
    objs = [out.with_name(f".{src.stem}.{tag}.o") for src in SOURCES]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    compile_flags = [*_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-I{p}" for p in includes)]
    try:
        # One translation unit per process: each spends ~12 s in torch's headers.
        procs = [subprocess.Popen([cxx, *compile_flags, "-c", str(src), "-o", str(obj)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for src, obj in zip(SOURCES, objs)]
        for src, proc in zip(SOURCES, procs):
            _, err = proc.communicate(timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"compiling {src.name} failed:\n{err[-4000:]}")
        res = subprocess.run([cxx, *_FLAGS, *map(str, objs), "-o", str(tmp), f"-L{libdir}", "-ltorch", "-ltorch_cpu",
                              "-lc10", f"-Wl,-rpath,{libdir}"], capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise RuntimeError(f"linking the kernels failed:\n{res.stderr[-4000:]}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        for obj in objs:
            obj.unlink(missing_ok=True)
    return out


def load() -> bool:
    """Build if needed and load the ops into this process; False (warned once) if that cannot be done."""
    global _state
    if _state is not None:
        return _state
    with _lock:
        if _state is None:
            try:
                import torch
                torch.ops.load_library(str(build()))
                _state = True
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:   # no compiler, no headers, a
                # failed or timed-out build, a library that does not load: plain torch ops
                log.warning("native CPU kernels unavailable, using plain torch ops: %s", e)
                _state = False
    return _state


def main() -> int:
    try:
        path = build(force="--force" in sys.argv)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(f"switchyard kernels: not built ({e}); the engine will run plain torch ops on CPU", file=sys.stderr)
        return 0   # optional speed-up: never fail an install over it
    import torch
    torch.ops.load_library(str(path))
    simd = torch.ops.switchyard.block_linear_simd()
    print(f"switchyard kernels: {path} ({'SIMD' if simd else 'scalar'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
