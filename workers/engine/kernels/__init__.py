"""Native CPU kernels, compiled on this machine (workers/engine/kernels/build.py)."""
