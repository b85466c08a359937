"""bench/moe_layer.py on a CPU at a tiny shape, for both families: moecpt's block and transformers' (eager and
grouped_mm experts) agree on the same weights and inputs before anything is timed, and the ratios are printed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .test_bench_scripts import ENV, REPO, last_json

pytest.importorskip("transformers")


@pytest.mark.parametrize("family, extra", [
    ("mixtral", []),
    ("qwen3_moe", []),
    ("qwen3_moe", ["--no-norm-topk"]),
])
def test_moe_layer_bench_compares_moecpt_with_the_family_block(family, extra):
    cmd = [sys.executable, str(REPO / "bench" / "moe_layer.py"), "--family", family, "--device", "cpu",
           "--tokens", "96", "--hidden", "32", "--ffn", "16", "--experts", "16", "--top-k", "8" if family != "mixtral"
           else "2", "--warmup", "1", "--steps", "2", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = last_json(proc.stdout)
    assert (r["family"], r["experts"], r["norm_topk"]) == (family, 16, not extra)
    for impl in ("eager", "grouped_mm"):
        assert r[f"transformers_{impl}_tokens_per_s"] > 0 and r[f"ratio_vs_transformers_{impl}"] > 0
        assert f"moecpt / transformers_{impl}:" in proc.stdout


def test_qwen3_moe_defaults_are_a_fine_grained_shape():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from moe_layer import parse_args
    finally:
        sys.path.pop(0)
    args = parse_args(["--family", "qwen3_moe", "--device", "cpu"])
    assert args.experts >= 64 and args.top_k == 8 and args.norm_topk
    assert parse_args(["--family", "qwen3_moe", "--device", "cuda"]).experts == 128
    with pytest.raises(SystemExit):
        parse_args(["--family", "mixtral", "--no-norm-topk"])
