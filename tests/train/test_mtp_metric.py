"""The multi-token prediction loss is logged: a DeepSeek-V3 run that trains an MTP layer writes `mtp_loss` (the
MTP cross-entropy per target token, before mtp_loss_coef) to metrics.jsonl and the console line; a run without
MTP has no such key."""

from __future__ import annotations

import math

from moecpt.train.metrics import read_metrics
from moecpt.train.trainer import train

DEEPSEEK = ["--model.preset=deepseek-v3-tiny", "--training.steps=2", "--checkpoint.interval=0",
            "--logging.val_batches=0", "--model.overrides.vocab_size=32000", "--model.overrides.num_key_value_heads=4"]


def step_records(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "loss" in r]


def test_a_run_training_mtp_logs_its_loss_and_one_without_does_not(tiny_config, tmp_path, capsys):
    train(tiny_config(f"--run_dir={tmp_path / 'mtp'}", *DEEPSEEK, "--model.overrides.num_nextn_predict_layers=1",
                      "--model.overrides.mtp_loss_coef=0.3"))
    mtp_console = capsys.readouterr().out
    records = step_records(tmp_path / "mtp")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert math.isfinite(r["mtp_loss"]) and r["mtp_loss"] > 0
        # per target token, like `loss`: near ln(vocab) for a freshly initialised model, as the main loss is
        assert 0.5 * r["loss"] < r["mtp_loss"] < 1.5 * r["loss"]
    assert f"mtp {records[-1]['mtp_loss']:.4f}" in mtp_console

    # An MTP layer kept but not trained (mtp_loss_coef = 0): no key, no console field.
    train(tiny_config(f"--run_dir={tmp_path / 'off'}", *DEEPSEEK, "--model.overrides.num_nextn_predict_layers=1"))
    off_console = capsys.readouterr().out
    records = step_records(tmp_path / "off")
    assert len(records) == 2 and all("mtp_loss" not in r for r in records)
    assert "step 2/2 | loss " in off_console and " | mtp " not in off_console
