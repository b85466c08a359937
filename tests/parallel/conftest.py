"""Multi-process runs on CPU with gloo, launched with torchrun exactly as a user would, each bounded by a timeout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moecpt.config import load_config

from ..tiny_config import tiny_config_toml

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 240  # seconds for one multi-process run; a hang fails the test instead of blocking CI


def torchrun(nproc: int, args: list[str], timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N ARGS` (a free rendezvous port on localhost); fails on a
    non-zero exit or a timeout, showing the output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"timed out after {timeout}s (a hang?): {' '.join(cmd)}\n{out[-4000:]}")
    if proc.returncode:
        pytest.fail(f"exit {proc.returncode}: {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def parallel_config(tmp_path_factory, tiny_corpora) -> Path:
    """The tiny config (tests/tiny_config.py): 4 steps of 4 sequences, micro-batch 1 (so that the
    load-balancing loss, a per-micro-batch mean, is the same whatever the number of ranks), checkpoints at
    steps 2 and 4."""
    root = tmp_path_factory.mktemp("parallel")
    text = tiny_config_toml(root / "run", root / "shards", tiny_corpora, resume="never", changes={
        "schedule": {"warmup_steps": 2}, "training": {"steps": 4, "micro_batch": 1},
        "checkpoint": {"interval": 2}, "logging": {"val_batches": 1}})
    path = root / "cfg.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def config_for(parallel_config):
    def make(*overrides: str):
        return load_config(parallel_config, list(overrides))

    return make
