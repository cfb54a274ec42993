#!/usr/bin/env bash
# GPU benchmark suite: engine and serving benchmarks on random-weight Llama-3.2-1B and Llama-3.1-8B
# shapes (no hub downloads), within a time budget; JSON, logs and PNG plots go to one folder.
#
#   bench/gpu_suite.sh [OUT_DIR] [BUDGET_SECONDS]
#   default OUT_DIR: benchmarks/results/<gpu-name>-<date>; default budget: 1500 s
#
# Each step gets at most what is left of the budget (and is skipped below 60 s), so the suite always
# ends on time with whatever it finished. Copy the headline figures into benchmarks/results/README.md
# and the README's performance section, naming the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
if [ -z "$GPU" ]; then
  echo "gpu_suite: no NVIDIA GPU visible (nvidia-smi); nothing to do" >&2
  exit 2
fi
SLUG=$(echo "$GPU" | tr 'A-Z ' 'a-z-' | tr -cd 'a-z0-9-')
OUT=${1:-benchmarks/results/${SLUG}-$(date +%Y%m%d-%H%M)}
BUDGET=${2:-1500}
mkdir -p "$OUT"
START=$(date +%s)
LOG="$OUT/suite.log"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
echo "gpu_suite: $GPU -> $OUT (budget ${BUDGET}s)" | tee "$LOG"

step() {   # step NAME CMD...: run CMD with the time that is left; log its output
  local name=$1; shift
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 60 ]; then
    echo "== $name: skipped (${left}s of budget left)" | tee -a "$LOG"
    return 0
  fi
  echo "== $name (up to ${left}s): $*" | tee -a "$LOG"
  local t0=$(date +%s)
  timeout --kill-after=10 "$left" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
}

SV="$PY -m services.cli bench"
# The headline figures first, so a short device session still gets them: the engine issue's
# 8B goals (batch-1 decode ms/step; offline 1000 x 256 prompt / 256 output tokens) and LoRA on 8B.
step "engine offline llama-8b 1000x256/256" $SV engine --random-weights llama-8b --device cuda \
     --num-requests 1000 --prompt-len 256-256 --output-len 256-256 --max-num-seqs 256 \
     --max-num-batched-tokens 8192 --no-hf --no-llama-cpp --json "$OUT/engine-offline-llama-8b.json"
step "lora llama-8b" $SV lora --model random:llama-8b --device cuda --no-peft --swap-trials 20 \
     --json "$OUT/lora-llama-8b.json"
for SHAPE in llama-1b llama-8b; do
  M="random:$SHAPE"
  # offline engine throughput (ours vs HF generate; the 8B skips HF's slower static batches)
  HF=""; [ "$SHAPE" = llama-8b ] && HF="--no-hf"
  step "engine $SHAPE" $SV engine --random-weights "$SHAPE" --device cuda --num-requests 256 \
       --prompt-len 128-1024 --output-len 64-256 --max-num-seqs 128 --max-num-batched-tokens 4096 \
       --no-llama-cpp $HF --json "$OUT/engine-$SHAPE.json"
  # serving: Poisson rate sweep in-process (latency percentiles vs rate, throughput, cost)
  step "serve sweep $SHAPE" $SV serve --inproc --model "$M" --device cuda --max-num-seqs 128 \
       --load sweep --sweep-rates 2,4,8,16,32 --num-requests 200 --input-len 128-1024 --output-len 64-256 \
       --slo-ttft-ms 50 --slo-tpot-ms 50 --no-progress --json "$OUT/serve-sweep-$SHAPE.json" --plot "$OUT/serve-sweep-$SHAPE"
  # the real chat prompt set at a steady rate
  step "serve chat $SHAPE" $SV serve --inproc --model "$M" --device cuda --max-num-seqs 128 \
       --workload chat --num-requests 300 --load poisson --request-rate 10 --slo-ttft-ms 50 --slo-tpot-ms 50 \
       --no-progress --json "$OUT/serve-chat-$SHAPE.json" --plot "$OUT/serve-chat-$SHAPE"
  # static vs continuous batching (and ours vs HF for the 1B) under the same Poisson load
  WHAT="--batching --engine"; [ "$SHAPE" = llama-8b ] && WHAT="--batching"
  step "compare $SHAPE" $SV compare $WHAT --model "$M" --device cuda --num-kv-blocks 8192 --max-model-len 4096 \
       --batch-size 32 --num-requests 256 --input-len 128-1024 --output-len 32-512 --request-rate 20 \
       --no-progress --json "$OUT/compare-$SHAPE.json" --plot "$OUT/compare-$SHAPE"
done
# the full stack (router + NATS + batcher + worker) under a 10x spike, 1B shape
step "serve spike stack llama-1b" $SV serve --model random:llama-1b --device cuda --max-num-seqs 128 \
     --max-waiting 256 --load spike --request-rate 4 --spike-before-s 20 --spike-s 20 --spike-after-s 40 \
     --input-len 128-1024 --output-len 64-256 --slo-ttft-ms 50 --no-progress \
     --json "$OUT/serve-spike-llama-1b.json" --plot "$OUT/serve-spike-llama-1b"

echo "gpu_suite: done in $(( $(date +%s) - START ))s; results in $OUT" | tee -a "$LOG"
