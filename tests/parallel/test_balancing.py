"""Global-batch load balancing: the expert fractions of the load-balancing loss are summed over the
data-parallel ranks before the product, so the same global batch gives the same loss on 1, 2 and 4 ranks.
Micro-batch balancing (each forward pass alone) does not: its loss depends on how the batch is split."""

from __future__ import annotations

from pathlib import Path

import pytest

from moecpt.train.metrics import read_metrics
from moecpt.train.trainer import train

from .conftest import torchrun

STEPS = 2
GLOBAL_BATCH = 4


def trace(run_dir: Path) -> list[float]:
    """Cross-entropy and load-balancing loss of each step, flat."""
    return [x for r in read_metrics(run_dir) if "loss" in r for x in (r["loss"], r["lb_loss"])]


def args(run_dir: Path, world: int, scope: str) -> list[str]:
    return [f"--run_dir={run_dir}", f"--training.steps={STEPS}", f"--training.global_batch={GLOBAL_BATCH}",
            f"--training.micro_batch={GLOBAL_BATCH // world}", "--checkpoint.interval=0",
            f"--model.overrides.router_balance_scope={scope}", "--checkpoint.export_at_end=false"]


@pytest.mark.slow
def test_global_scope_gives_the_same_loss_at_any_world_size(parallel_config, config_for, tmp_path):
    train(config_for(*args(tmp_path / "w1", 1, "global")))
    one = trace(tmp_path / "w1")
    for world in (2, 4):
        torchrun(world, ["-m", "moecpt.train", "--config", str(parallel_config),
                         *args(tmp_path / f"w{world}", world, "global")])
        assert trace(tmp_path / f"w{world}") == pytest.approx(one, rel=1e-5), world


def test_micro_batch_scope_depends_on_the_split_and_global_does_not_on_one_rank(config_for, tmp_path):
    """On one process, 4 sequences in one forward pass against 4 accumulated passes of one: the global
    scope has no other ranks to sum over, so it is the micro-batch scope, and both change with the split."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(config_for(*args(whole, 1, "micro_batch")))
    train(config_for(*args(split, 4, "micro_batch")))  # micro-batch 1: 4 passes of one sequence
    (ce_w, lb_w), (ce_s, lb_s) = trace(whole)[:2], trace(split)[:2]
    assert ce_w == pytest.approx(ce_s, rel=1e-5)  # the same tokens and weights: the same cross-entropy
    assert abs(lb_w - lb_s) > 1e-4 * lb_w, (lb_w, lb_s)  # a different balancing loss
