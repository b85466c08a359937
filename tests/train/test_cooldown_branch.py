"""A cooldown branch (`init_from` + `schedule.decay_only`) off a WSD run: it continues the checkpoint's
optimizer state, step count and data position, and decays to min_lr at its last step, reproducing the run
whose decay began at that step; what cannot be branched from is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import get_state_dict

from moecpt.errors import UserError
from moecpt.report.plots import lr_curves, read_schedule
from moecpt.train import checkpoint as ckpt_lib
from moecpt.train.export import export_hf
from moecpt.train.metrics import read_metrics
from moecpt.train.trainer import Trainer, train

# 6 steps, 2 of warmup, decay over the last 2 (1/3 of 6): stable at lr for steps 3 and 4, checkpoint at step 4.
WSD = ("--training.steps=6", "--schedule.kind=wsd", "--schedule.warmup_steps=2",
       "--schedule.decay_fraction=0.3333", "--schedule.decay=1-sqrt")


@pytest.fixture(scope="module")
def wsd_run(tmp_path_factory, corpora, shard_cache):
    """The parent: a WSD run that decays over its last 2 steps; checkpoints at steps 4 and 6."""
    from moecpt.config import load_config

    from ..tiny_config import tiny_config_toml

    tmp = tmp_path_factory.mktemp("wsd")
    cfg_path = tmp / "cfg.toml"
    cfg_path.write_text(tiny_config_toml(tmp / "parent", shard_cache, corpora))
    result = train(load_config(cfg_path, list(WSD)))
    assert result["reason"] == "finished"
    return cfg_path, tmp / "parent"


def _branch_config(cfg_path: Path, run_dir: Path, init_from: Path, *extra: str):
    from moecpt.config import load_config

    return load_config(cfg_path, [*WSD, f"--run_dir={run_dir}", f"--init_from={init_from}",
                                  "--schedule.decay_only=true", *extra])


def _saved_optimizer(ckpt: Path, tmp: Path) -> dict:
    dcp_to_torch_save(str(ckpt), str(tmp / "ckpt.pt"))
    return torch.load(tmp / "ckpt.pt", weights_only=False)["optim"]["state"]


def test_branch_continues_the_optimizer_and_reproduces_the_run_that_decayed_there(wsd_run, tmp_path):
    cfg_path, parent = wsd_run
    step4 = parent / "checkpoints" / "step_00000004"
    trainer = Trainer.from_config(_branch_config(cfg_path, tmp_path / "branch", step4))
    try:
        assert trainer.step == 4 and trainer.branch.step == 4 and trainer.branch.lr == pytest.approx(3e-3)
        assert trainer.loader.state.samples_consumed == 4 * 4  # the parent's data position, not a fresh one
        _, optim = get_state_dict(trainer.model, trainer.optimizer)
        saved = _saved_optimizer(step4, tmp_path)
        assert set(optim["state"]) == set(saved) and len(saved) > 10
        for name, moments in saved.items():  # AdamW moments and step counts as the checkpoint holds them
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(optim["state"][name][key], moments[key]), (name, key)
        assert float(saved[next(iter(saved))]["step"]) == 4
    finally:
        trainer.lock.release()
    result = train(_branch_config(cfg_path, tmp_path / "branch", step4))
    assert result["reason"] == "finished"
    records = [r for r in read_metrics(tmp_path / "branch") if "loss" in r]
    assert [r["step"] for r in records] == [5, 6]
    assert records[-1]["lr"] == pytest.approx(3e-4)  # optimizer.min_lr at the branch's last step
    # The parent's own decay began at step 4 with the same shape: the branch is that run, exactly.
    parent_records = {r["step"]: r for r in read_metrics(parent) if "loss" in r}
    assert [(r["loss"], r["lr"]) for r in records] == [(parent_records[s]["loss"], parent_records[s]["lr"])
                                                      for s in (5, 6)]
    a = ckpt_lib.load_model(parent / "checkpoints" / "step_00000006").state_dict()
    b = ckpt_lib.load_model(tmp_path / "branch").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The LR figure draws the planned schedule: the branch's decay, from its checkpoint's LR to min_lr.
    curves = lr_curves(read_schedule(tmp_path / "branch"), records)
    planned = curves["planned (cooldown branch, 1-sqrt decay)"]
    assert planned[0] == [5, 6] and planned[1] == pytest.approx([r["lr"] for r in records])
    # A rerun resumes the branch as a branch (here: it is finished); without decay_only it is refused.
    with pytest.raises(UserError, match="belongs to a cooldown branch"):
        Trainer.from_config(_branch_config(cfg_path, tmp_path / "branch", step4, "--schedule.decay_only=false"))


def test_a_branch_that_starts_early_in_the_stable_phase_decays_from_its_lr(wsd_run, tmp_path):
    from moecpt.train.schedule import lr_at

    cfg_path, parent = wsd_run
    cfg = _branch_config(cfg_path, tmp_path / "b", parent / "checkpoints" / "step_00000004",
                         "--training.steps=9", "--schedule.decay=linear")
    trainer = Trainer.from_config(cfg)
    trainer.lock.release()
    lrs = [lr_at(s, 9, cfg.optimizer, cfg.schedule, trainer.branch) for s in range(4, 9)]
    assert lrs == pytest.approx([3e-3 - (3e-3 - 3e-4) * k / 5 for k in range(1, 6)])  # 5 steps down to min_lr


def test_what_cannot_be_branched_from_is_refused(wsd_run, tmp_path):
    cfg_path, parent = wsd_run
    step6 = parent / "checkpoints" / "step_00000006"
    hf = export_hf(ckpt_lib.load_model(step6), None, tmp_path / "hf")
    with pytest.raises(UserError, match="Hugging Face directory, which holds no optimizer state"):
        Trainer.from_config(_branch_config(cfg_path, tmp_path / "x", hf))
    with pytest.raises(UserError, match="is at step 6, so training.steps .6. leaves no step to decay over"):
        Trainer.from_config(_branch_config(cfg_path, tmp_path / "y", step6))
    with pytest.raises(UserError, match="schedule.decay_only needs init_from"):
        from moecpt.config import load_config

        load_config(cfg_path, ["--schedule.decay_only=true"])
    # the parent's own run_dir holds a run that is no branch: a branch there is refused, not silently resumed
    with pytest.raises(UserError, match="a branch goes into a run_dir of its own"):
        Trainer.from_config(_branch_config(cfg_path, parent, parent / "checkpoints" / "step_00000004",
                                           "--training.steps=8"))
