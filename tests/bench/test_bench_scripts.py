"""bench/step_breakdown.py, bench/kernels.py and scripts/check_bf16.py run on a CPU at a tiny shape (breakage checks; the
bf16 check also really compares the two precisions, on the first documents of the shared corpora)."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..corpora import corpus_file

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "2"}


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_step_breakdown_accounts_for_the_step(tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "step_breakdown.py"), "--device", "cpu", "--shape", "tiny",
           "--micro-batch", "2", "--seq-len", "32", "--warmup", "1", "--steps", "2", "--ce-chunk", "24",
           "--profile", str(tmp_path / "prof")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = last_json(proc.stdout)
    pieces = r["pieces_ms"]
    assert set(pieces) == {"attention", "experts", "router + permutation", "rmsnorm", "lm head + loss",
                           "optimizer", "rest"}
    assert all(math.isfinite(v) for v in pieces.values())
    assert all(pieces[k] > 0 for k in ("attention", "experts", "lm head + loss", "optimizer"))
    # the pieces and the rest add up to the measured step
    assert math.isclose(sum(pieces.values()), r["step_ms"], rel_tol=1e-2)
    assert (tmp_path / "prof" / "train_step_trace.json").stat().st_size > 0
    assert "Name" in (tmp_path / "prof" / "top_ops.txt").read_text()


def test_bf16_run_tracks_the_fp32_run(tmp_path):
    """The check itself on a small model: both runs see the same batches, and their windowed losses agree."""
    data = tmp_path / "corpus"
    script = REPO / "scripts" / "check_bf16.py"
    sys.path.insert(0, str(script.parent))
    try:
        from check_bf16 import CORPORA
    finally:
        sys.path.pop(0)
    for files in CORPORA.values():
        for f in files:
            (data / f).parent.mkdir(parents=True, exist_ok=True)
            with open(corpus_file(f), encoding="utf-8") as src:
                (data / f).write_text("".join(itertools.islice(src, 60)), encoding="utf-8")
    cmd = [sys.executable, str(script), "--data", str(data), "--preset", "tiny", "--layers", "1",
           "--steps", "12", "--batch", "4", "--seq-len", "32", "--window", "4", "--skip", "4",
           "--tolerance", "0.02", "--device", "cpu", "--out", str(tmp_path / "runs")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV, cwd=REPO)
    r = last_json(proc.stdout)
    assert proc.returncode == 0 and r["pass"], proc.stdout[-3000:] + proc.stderr[-3000:]
    assert r["steps"] == 12 and 0 <= r["max_rel_gap"] <= 0.02
    assert r["max_step_abs_diff"] > 0  # the two runs really computed in different precisions
    for dtype in ("float32", "bfloat16"):
        cfg = (tmp_path / "runs" / dtype / "config.toml").read_text()
        assert f'dtype = "{dtype}"' in cfg


@pytest.mark.parametrize("tolerance, code", [("0.0", 1)])
def test_bf16_check_fails_when_the_gap_exceeds_the_tolerance(tolerance, code):
    """compare() reports the largest windowed gap; a zero tolerance must fail on any real difference."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from check_bf16 import compare, windowed
    finally:
        sys.path.pop(0)
    assert windowed([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    r = compare([10.0, 9.0, 8.0, 7.0], [10.0, 9.1, 8.0, 7.0], window=1, skip=0)
    assert math.isclose(r["max_rel_gap"], 0.1 / 9.0) and r["at_step"] == 2
    assert r["max_rel_gap"] > float(tolerance)


def test_kernel_bench_runs_in_the_interpreter_and_checks_accuracy():
    pytest.importorskip("triton")
    cmd = [sys.executable, str(REPO / "bench" / "kernels.py"), "--device", "cpu", "--reps", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**ENV, "TRITON_INTERPRET": "1"},
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = last_json(proc.stdout)
    assert [row["op"] for row in r["rows"]] == ["rmsnorm", "rope (q)", "rope (k)", "swiglu", "lm head + loss"]
    for row in r["rows"]:
        assert row["fused_ms"] > 0 and row["ref_ms"] > 0
        assert row["err_fused"] < 1e-5  # fp32 on a CPU: the kernels agree with the reference to rounding


def test_kernel_bench_says_why_it_cannot_run():
    env = {k: v for k, v in ENV.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "kernels.py"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 2 and "cannot run Triton here" in proc.stderr
