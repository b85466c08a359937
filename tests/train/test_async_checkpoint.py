"""Asynchronous checkpoints (`checkpoint.async_save`): the same atomic rename, validity record and resume
guarantee as synchronous ones. A checkpoint is listed (COMPLETE, records) only after its background write has
finished, so a kill during the write leaves the previous checkpoint the latest; resuming from one is exact."""

from __future__ import annotations

import shutil

import torch

from moecpt.config import CheckpointSection
from moecpt.model import build_model
from moecpt.model.families import preset_config
from moecpt.train import checkpoint as ckpt_lib
from moecpt.train.metrics import read_metrics
from moecpt.train.trainer import train


def test_an_async_checkpoint_is_valid_only_after_its_write_and_holds_the_state_of_its_step(tmp_path):
    config = preset_config("tiny", vocab_size=64, hidden_size=16, intermediate_size=24, num_attention_heads=2,
                           num_key_value_heads=1, num_hidden_layers=1)
    model = build_model(config, device="cpu", seed=0)
    optimizer = torch.optim.AdamW(model.parameters())
    ckpt = ckpt_lib.Checkpointer(tmp_path, CheckpointSection(async_save=True, keep_last=1))
    first = ckpt.save(1, model, optimizer, {"data": {}})
    with torch.no_grad():  # training goes on while the write runs
        for p in model.parameters():
            p.add_(1.0)
    at_step_2 = {k: v.clone() for k, v in model.state_dict().items()}
    # Until it is waited for, nothing marks it complete: a kill now would leave no checkpoint to resume from.
    assert not first.exists() and ckpt_lib.newest_valid_checkpoint(ckpt.root) is None
    assert not (ckpt.pending.tmp / ckpt_lib.COMPLETE).exists()
    second = ckpt.save(2, model, optimizer, {"data": {}})  # waits for the first, then starts the second
    assert ckpt_lib.verify_checkpoint(first) == [] and ckpt_lib.newest_valid_checkpoint(ckpt.root) == first
    assert ckpt.wait() == second and ckpt_lib.verify_checkpoint(second) == []
    assert not first.exists()  # keep_last = 1: pruned once the second was complete
    fresh = build_model(config, device="cpu", seed=1)
    ckpt_lib.load_model_weights(second, fresh)
    assert all(torch.equal(v, at_step_2[k]) for k, v in fresh.state_dict().items())
    fresh = build_model(config, device="cpu", seed=1)
    ckpt_lib.load_model_weights(ckpt.save(3, model, optimizer, {"data": {}}) and ckpt.wait(), fresh)
    assert all(torch.equal(v, at_step_2[k]) for k, v in fresh.state_dict().items())


def test_resume_after_an_async_checkpoint_is_exact(tiny_config, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = ["--training.steps=8", "--checkpoint.interval=4", "--checkpoint.async_save=true"]
    result = train(tiny_config(*args, f"--run_dir={whole}"))
    assert result["reason"] == "finished"
    done = ckpt_lib.list_checkpoints(whole / "checkpoints")
    assert [s for s, _ in done] == [4, 8] and all(ckpt_lib.verify_checkpoint(d) == [] for _, d in done)
    # A run that had only the step-4 checkpoint (as after a kill during step 8's write) resumes from it.
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(done[0][1], cut / "checkpoints" / done[0][1].name)
    train(tiny_config(*args, f"--run_dir={cut}"))
    losses = {r["step"]: r["loss"] for r in read_metrics(whole) if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in read_metrics(cut) if "loss" in r}
    assert resumed == {s: losses[s] for s in (5, 6, 7, 8)}
    a = ckpt_lib.load_model(whole).state_dict()
    b = ckpt_lib.load_model(cut).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
