"""bench/train_step.py runs on a CPU at a tiny shape and ends with its JSON line (a breakage check, not speed)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_train_step_bench_prints_its_json_line():
    cmd = [sys.executable, str(REPO / "bench" / "train_step.py"), "--device", "cpu", "--shape", "tiny",
           "--micro-batch", "2", "--seq-len", "32", "--warmup", "1", "--steps", "2", "--ce-chunk", "24",
           "--compare-hf", "--hf-cases", "eager"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["shape"] == "tiny" and r["tokens_per_step"] == 64 and r["ce_chunk_tokens"] == 24
    for key in ("tokens_per_s", "model_tflops", "peak_fraction", "peak_memory_gib", "best_hf_tflops",
                "ratio_vs_best_hf", "hf_eager_tokens_per_s"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    assert r["best_hf"] == "eager"
    assert math.isclose(r["model_tflops"], r["tokens_per_s"] * r["flops_per_token"] / 1e12, rel_tol=1e-2)
    assert math.isclose(r["ratio_vs_best_hf"], r["tokens_per_s"] / r["hf_eager_tokens_per_s"], rel_tol=1e-2)
    assert 9.0 < r["loss"] < 12.0  # random ids over 32,000 pieces: about ln(32000) = 10.4
