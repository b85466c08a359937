#!/usr/bin/env bash
# Every GPU check of the throughput work in one call, most important first, each under its own time limit
# so that one that hangs or runs long does not cost the rest. Meant for the device tool: first, here,
#   bash bench/gpu_prepare.sh
# then one call with carry [".gpu"] and the command `bash bench/gpu_session.sh` (timeout_s ~560). About 8
# minutes on an H100/H200. Everything lands in $OUT/session.log, and the JSON lines in $OUT/results.jsonl.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/moecpt-gpu}
mkdir -p "$OUT"
LOG="$OUT/session.log"
TOK=.gpu/tokenizer.model
PY=python3

run() {  # run NAME SECONDS CMD...: the command's output to the log, its last lines to the console
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$LOG"
  timeout "$limit" "$@" >"$OUT/.part" 2>&1
  local rc=$?
  cat "$OUT/.part" >>"$LOG"
  grep '^{' "$OUT/.part" | sed "s/^{/{\"step\": \"$name\", \"rc\": $rc, /" >>"$OUT/results.jsonl"
  grep -v '^{' "$OUT/.part" | grep -v '^step [0-9]' | tail -n 14
  echo "--- $name: exit $rc" | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)"; } 2>&1 | tee -a "$LOG"

# 1. Kernels: each Triton kernel against its reference at the bench-1b shapes (accuracy and speed).
run kernels 90 $PY bench/kernels.py
# 2. The issue's table: moecpt compiled next to the transformers rows, same process.
run compare 300 $PY bench/train_step.py --compare-hf --compile --tokenizer $TOK
# 3. moecpt eager, Triton kernels on and off; cuDNN attention first.
run eager_triton 60 $PY bench/train_step.py --tokenizer $TOK
run eager_torch 60 $PY bench/train_step.py --triton off --tokenizer $TOK
run eager_cudnn 60 $PY bench/train_step.py --sdpa cudnn --tokenizer $TOK
# 4. Where the time goes (eager pieces) and a profiler table.
run breakdown 90 $PY bench/step_breakdown.py --tokenizer $TOK --profile "$OUT/prof"
# 5. The other shapes the issue asks for.
run mb2 45 $PY bench/train_step.py --micro-batch 2 --tokenizer $TOK
run mb4 45 $PY bench/train_step.py --micro-batch 4 --tokenizer $TOK
run seq4096 60 $PY bench/train_step.py --micro-batch 4 --seq-len 4096 --tokenizer $TOK
# 6. Numerics: 200 steps of bf16 (Triton kernels on) against fp32 on the shared corpora.
run bf16 150 $PY scripts/check_bf16.py --preset bench-1b --layers 4 --batch 8 --seq-len 1024 --lr 3e-4 \
  --triton auto --tokenizer $TOK --data .gpu/corpus
rm -f "$OUT/.part"
rm -rf "$OUT/prof"/*.json  # the trace is too large to come back; top_ops.txt stays
echo "=== done $(date +%T)"
