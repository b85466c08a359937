#!/usr/bin/env bash
# Every GPU check of the throughput work in one call, most important first, each under its own time limit
# so that one that hangs or runs long does not cost the rest. Meant for the device tool: first, here,
#   bash bench/gpu_prepare.sh
# then one call with carry [".gpu"] and the command `bash bench/gpu_session.sh` (timeout_s 600). The whole
# script keeps to BUDGET seconds (default 540): each step's limit is cut to what is left, and a step with
# under 20 s left is skipped. Everything lands in $OUT/session.log, the JSON lines in $OUT/results.jsonl.
set -u
END=$((SECONDS + ${BUDGET:-540}))
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/moecpt-gpu}
mkdir -p "$OUT"
LOG="$OUT/session.log"
TOK=.gpu/tokenizer.model
PY=python3

run() {  # run NAME SECONDS CMD...: the command's output to the log, its last lines to the console
  local name=$1 limit=$2 left=$((END - SECONDS - 10))
  shift 2
  if [ "$left" -lt 20 ]; then echo "=== $name: skipped, ${left}s left" | tee -a "$LOG"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$LOG"
  timeout -k 10 "$limit" "$@" >"$OUT/.part" 2>&1
  local rc=$?
  cat "$OUT/.part" >>"$LOG"
  grep '^{' "$OUT/.part" | sed "s/^{/{\"step\": \"$name\", \"rc\": $rc, /" >>"$OUT/results.jsonl"
  grep -v '^{' "$OUT/.part" | grep -v '^step [0-9]' | tail -n 14
  echo "--- $name: exit $rc" | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)"
  # Triton builds its launchers with the host C compiler and Python's headers
  cc --version | head -1
  $PY -c "import os, sysconfig; print('Python.h', os.path.exists(sysconfig.get_paths()['include'] + '/Python.h'))"
} 2>&1 | tee -a "$LOG"

# 1. Kernels: each Triton kernel against its reference at the bench-1b shapes (accuracy and speed).
run kernels 60 $PY bench/kernels.py
# 2. The issue's table: moecpt compiled next to the transformers rows, same process.
run compare 240 $PY bench/train_step.py --compare-hf --compile --tokenizer $TOK
# 3. Numerics: 200 steps of bf16 (Triton kernels on) against fp32 on the shared corpora.
run bf16 100 $PY scripts/check_bf16.py --preset bench-1b --layers 4 --batch 8 --seq-len 1024 --lr 3e-4 \
  --triton auto --tokenizer $TOK --data .gpu/corpus
# 4. moecpt eager with the Triton kernels on and off, and where the time goes (+ a profiler table).
run eager_triton 45 $PY bench/train_step.py --tokenizer $TOK
run eager_torch 45 $PY bench/train_step.py --triton off --tokenizer $TOK
run breakdown 60 $PY bench/step_breakdown.py --tokenizer $TOK --profile /tmp/moecpt-prof
cp /tmp/moecpt-prof/top_ops.txt "$OUT/" 2>/dev/null  # the trace itself is too large to come back
# 5. The other shapes the issue asks for, then cuDNN attention first.
run mb2 35 $PY bench/train_step.py --micro-batch 2 --tokenizer $TOK
run mb4 35 $PY bench/train_step.py --micro-batch 4 --tokenizer $TOK
run seq4096 45 $PY bench/train_step.py --micro-batch 4 --seq-len 4096 --tokenizer $TOK
run eager_cudnn 45 $PY bench/train_step.py --sdpa cudnn --tokenizer $TOK
rm -f "$OUT/.part"
echo "=== done $(date +%T)"
