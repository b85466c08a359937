"""FSDP (2 ranks) and FSDP + expert parallelism (4 ranks, EP 2) match one process for the families with
what Mixtral does not have: a dense layer among the MoE ones and QK-norm (qwen3_moe), a gated shared expert and
qkv biases (qwen2_moe). Same tolerances as test_training.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from moecpt.model.families import FAMILIES
from moecpt.train.trainer import train

from .conftest import torchrun
from .test_training import assert_same_run

PRESETS = [p for p, family in (("qwen3-moe-tiny", "qwen3_moe"), ("qwen2-moe-tiny", "qwen2_moe")) if family in FAMILIES]


@pytest.mark.parametrize("preset", PRESETS)
def test_sharded_runs_of_a_family_match_one_process(preset, parallel_config, config_for, tmp_path):
    # Micro-batch balancing: with 4 accumulated micro-batches on one process against 2 on each of 2 ranks,
    # the global scope sums expert counts over different groups (test_balancing.py covers that scope). The
    # tokenizer's 32,000 rows: 150k never-seen embedding rows would only add AdamW's amplified rounding.
    common = [f"--model.preset={preset}", "--training.steps=2", "--checkpoint.interval=0",
              "--model.overrides.router_balance_scope=micro_batch", "--model.overrides.vocab_size=32000"]
    runs = {name: tmp_path / name for name in ("single", "fsdp", "ep")}
    train(config_for(f"--run_dir={runs['single']}", *common))
    cfg = ["-m", "moecpt.train", "--config", str(parallel_config), *common]
    torchrun(2, [*cfg, f"--run_dir={runs['fsdp']}"])
    torchrun(4, [*cfg, f"--run_dir={runs['ep']}", "--parallel.expert_parallel=2"])
    for name in ("fsdp", "ep"):
        assert_same_run(Path(runs[name]), runs["single"], [1, 2])
