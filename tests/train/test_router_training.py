"""Aux-loss-free balancing in the trainer: the selection bias moves with the global expert load after each
step, is logged, is saved in checkpoints, and a resumed run continues it exactly."""

from __future__ import annotations

import torch

from moecpt.report.plots import plot_run
from moecpt.train import checkpoint as ckpt_lib
from moecpt.train.metrics import read_metrics
from moecpt.train.trainer import train

BIAS = ("--model.overrides.router_bias_update_rate=0.001", "--checkpoint.interval=2")


def test_the_bias_moves_is_logged_and_resumes_exactly(tiny_config, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(tiny_config(f"--run_dir={straight}", "--training.steps=4", *BIAS))
    records = [r for r in read_metrics(straight) if "loss" in r]
    norms = [r["router_bias_norm"] for r in records]
    assert len(norms) == 4 and all(len(n) == 2 for n in norms)  # every step, per MoE layer
    # Each step moves every expert's bias by +-rate (or 0 at exactly mean load): after step 1, |bias| <=
    # rate * sqrt(E); it keeps changing with the load.
    assert all(0 < n <= 0.001 * 2 * 1.0001 for n in norms[0])
    assert len({tuple(n) for n in norms}) > 1

    train(tiny_config(f"--run_dir={split}", "--training.steps=2", *BIAS))
    train(tiny_config(f"--run_dir={split}", "--training.steps=4", *BIAS))  # resumes at step 2
    assert [r["loss"] for r in read_metrics(split) if "loss" in r] == [r["loss"] for r in records]
    a = ckpt_lib.load_model(ckpt_lib.find_checkpoint(straight)).state_dict()
    b = ckpt_lib.load_model(ckpt_lib.find_checkpoint(split)).state_dict()
    bias = "layers.0.moe.gate.e_score_correction_bias"
    assert bias in a and a[bias].abs().sum() > 0
    assert all(torch.equal(a[k], b[k]) for k in a)
    made = {p.name for p in plot_run(straight)}
    assert {"router_bias.png", "expert_imbalance.png"} <= made


def test_without_the_rate_there_is_no_bias(tiny_config, tmp_path):
    train(tiny_config(f"--run_dir={tmp_path}", "--training.steps=1"))
    (record,) = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert "router_bias_norm" not in record
    state = ckpt_lib.load_model(ckpt_lib.find_checkpoint(tmp_path)).state_dict()
    assert not any("e_score_correction_bias" in k for k in state)
