"""A good checkpoint is never lost: non-finite streaks (no checkpoint written, the one before protected, the
stop recorded for the next run), resume = never, the run-directory lock, damaged checkpoints (verified, with a
fallback), atomic pruning, retention at start and a full disk."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moecpt.errors import UserError
from moecpt.train import checkpoint as ckpt_lib
from moecpt.train.metrics import read_metrics
from moecpt.train.trainer import Trainer, train

GOOD = ("--checkpoint.interval=2", "--checkpoint.keep_last=2", "--training.steps=16")


def losses(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


def steps_saved(run: Path) -> list[int]:
    return [s for s, _ in ckpt_lib.list_checkpoints(run / "checkpoints")]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return ckpt_lib.load_model(path).state_dict()


def stop_at(trainer: Trainer, step: int, monkeypatch) -> None:
    """Make `trainer` stop on SIGTERM after `step` (a clean stop with a checkpoint), as when every rank has
    read the signal in that step's collective."""
    real = trainer.train_step

    def step_then_signal():
        record = real()
        if trainer.step == step:
            trainer._stop_signal = trainer._agreed_stop = signal.SIGTERM
        return record

    monkeypatch.setattr(trainer, "train_step", step_then_signal)


def poison(trainer: Trainer, bad_steps: set[int], monkeypatch) -> None:
    """NaN losses on the given (1-based) steps."""
    real = trainer.model.forward

    def forward(*a, **kw):
        out = real(*a, **kw)
        if trainer.step + 1 in bad_steps:
            out.token_loss = out.token_loss * float("nan")
        return out

    monkeypatch.setattr(trainer.model, "forward", forward)


def test_diverging_reruns_keep_the_last_good_checkpoint_and_a_resume_reproduces_the_trace(
        tiny_config, tmp_path, monkeypatch):
    whole = train(tiny_config(f"--run_dir={tmp_path / 'whole'}", *GOOD))
    assert whole["reason"] == "finished"
    run = tmp_path / "run"
    trainer = Trainer.from_config(tiny_config(*GOOD))
    stop_at(trainer, 8, monkeypatch)
    assert trainer.train()["reason"] == "signal SIGTERM"
    good = run / "checkpoints" / "step_00000008"
    assert steps_saved(run) == [6, 8]

    diverge = (*GOOD, "--optimizer.lr=1e30")
    first = train(tiny_config(*diverge))  # resume = auto from step 8; step 9 blows the weights up
    assert first["reason"] == "5 non-finite steps in a row" and first["step"] == 14
    assert first["checkpoint"] == str(good)
    assert steps_saved(run) == [6, 8]  # nothing written in the streak (steps 10, 12, 14 were due), nothing pruned
    stop = ckpt_lib.read_stop_record(run)
    assert (stop.step, stop.streak_start, stop.in_a_row, stop.last_good) == (14, 10, 5, str(good))
    assert json.loads((run / "checkpoints" / ckpt_lib.PROTECTED).read_text())["keep"] == ["step_00000008"]

    for attempt in range(3):
        with pytest.raises(UserError, match=r"stopped at step 14 after 5 non-finite steps in a row .*"
                                            r"last good checkpoint is .*step_00000008.*--optimizer.lr=1e\+29"):
            Trainer.from_config(tiny_config(*diverge))  # the same command again: refused, nothing run
        if attempt < 2:  # retried explicitly as it is: it diverges again, the good checkpoint stays
            again = train(tiny_config(*diverge, f"--resume={good}"))
            assert again["reason"] == "5 non-finite steps in a row" and steps_saved(run) == [6, 8]
    assert not ckpt_lib.verify_checkpoint(good)

    back = Trainer.from_config(tiny_config(*GOOD))  # another lr: resumes from the last good checkpoint
    assert back.step == 8 and str(good) in back.start_mode
    assert back.train()["reason"] == "finished"
    assert losses(run) == losses(tmp_path / "whole")  # the original trace, each step once
    a, b = weights(tmp_path / "whole"), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ckpt_lib.read_stop_record(run) is None


def test_a_short_streak_writes_no_checkpoint_until_recovered_and_its_predecessor_is_never_pruned(
        tiny_config, tmp_path, monkeypatch):
    run = tmp_path / "run"
    trainer = Trainer.from_config(tiny_config("--checkpoint.interval=2", "--checkpoint.keep_last=1",
                                              "--checkpoint.recovery_steps=3", "--training.steps=14"))
    poison(trainer, {5, 6}, monkeypatch)
    written = []
    real_save = trainer.save
    monkeypatch.setattr(trainer, "save", lambda: written.append(trainer.step) or real_save())
    assert trainer.train()["reason"] == "finished"
    assert written == [2, 4, 10, 12, 14]  # not 6 (streak), nor 8 (two finite steps after it, three needed)
    assert steps_saved(run) == [4, 14]  # step 4 precedes the streak: kept although keep_last = 1
    state = ckpt_lib.read_trainer_state(run / "checkpoints" / "step_00000014")
    assert (state["nonfinite_total"], state["nonfinite_in_a_row"], state["streak_start"]) == (2, 0, 5)


def test_a_run_that_ends_in_a_streak_saves_no_final_checkpoint(tiny_config, tmp_path, monkeypatch):
    run = tmp_path / "run"
    trainer = Trainer.from_config(tiny_config("--training.steps=6"))
    poison(trainer, {6}, monkeypatch)
    result = trainer.train()
    assert result["reason"] == "ended with 1 non-finite steps in a row"
    assert steps_saved(run) == [4] and ckpt_lib.read_stop_record(run).last_good.endswith("step_00000004")


def test_resume_never_is_refused_where_checkpoints_exist(tiny_config, tmp_path):
    run = tmp_path / "run"
    train(tiny_config("--training.steps=4"))
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match=r"resume = 'never' but .*checkpoints holds checkpoints \(step_00000004\)"):
        Trainer.from_config(tiny_config("--training.steps=6", "--resume=never"))
    assert steps_saved(run) == [4] and (run / "metrics.jsonl").read_text() == before
    fresh = train(tiny_config("--training.steps=2", "--resume=never", f"--run_dir={tmp_path / 'new'}"))
    assert fresh["reason"] == "finished"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_training_on_a_run_dir_is_refused_and_a_stale_lock_is_taken_over(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    lock = run / ckpt_lib.LOCK_FILE
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"host": os.uname().nodename, "pid": holder.pid, "since": 0}))
        with pytest.raises(UserError, match=rf"another training is using .*run: process {holder.pid} on "):
            Trainer.from_config(tiny_config("--training.steps=2"))
        assert lock.is_file()
    finally:
        holder.kill()
        holder.wait()
    dead = _dead_pid()
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": dead, "since": 0}))
    trainer = Trainer.from_config(tiny_config("--training.steps=2"))
    assert f"removed the stale lock {lock} of process {dead}" in capsys.readouterr().out
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    trainer.train()
    assert not lock.exists()


# ---- damaged checkpoints ---------------------------------------------------------------------------------
def _shard(ckpt: Path) -> Path:
    return sorted(ckpt.glob("*.distcp"))[0]


DAMAGE = {
    "truncated shard": (lambda c: os.truncate(_shard(c), _shard(c).stat().st_size // 2), r"\.distcp has \d+ bytes"),
    "missing shard": (lambda c: _shard(c).unlink(), r"\.distcp is missing"),
    "missing .metadata": (lambda c: (c / ".metadata").unlink(), r"\.metadata is missing"),
    "missing trainer state": (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    "garbled trainer state": (lambda c: (c / "trainer_state.json").write_text('{"step": 8, "da'),
                              "trainer_state.json has .* bytes"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_found_and_resume_export_and_eval_fall_back_or_say_why(
        damage, tiny_config, tmp_path):
    from moecpt.cli import main

    run = tmp_path / "run"
    train(tiny_config("--training.steps=8"))
    newest = run / "checkpoints" / "step_00000008"
    hurt, what = DAMAGE[damage]
    hurt(newest)
    assert any(__import__("re").search(what, p) for p in ckpt_lib.verify_checkpoint(newest))
    with pytest.raises(UserError, match=rf"step_00000008 is not a valid moecpt checkpoint: .*{what}"):
        ckpt_lib.load_model(newest)  # what eval loads a model with
    assert main(["export", str(newest), str(tmp_path / "hf")]) == 2
    with pytest.warns(UserWarning, match="skipping the damaged checkpoint"):
        assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())  # exported from step 4
    with pytest.warns(UserWarning, match=rf"skipping the damaged checkpoint .*step_00000008: .*{what}"):
        trainer = Trainer.from_config(tiny_config("--training.steps=10"))
    assert trainer.step == 4
    trainer.lock.release()
    assert (run / "checkpoints" / "damaged" / "step_00000008").is_dir()  # set aside, not deleted


def test_a_checkpoint_records_its_files_and_an_old_one_without_a_record_still_loads(tiny_config, tmp_path):
    run = tmp_path / "run"
    train(tiny_config("--training.steps=4"))
    ckpt = run / "checkpoints" / "step_00000004"
    files = json.loads((ckpt / ckpt_lib.MANIFEST).read_text())["files"]
    assert {".metadata", "trainer_state.json", "rng_rank0.pt"} <= set(files)
    assert all(v["size"] == (ckpt / k).stat().st_size for k, v in files.items())
    (ckpt / ckpt_lib.MANIFEST).unlink()  # as written before manifests
    assert ckpt_lib.verify_checkpoint(ckpt) == [] and ckpt_lib.find_checkpoint(run) == ckpt


def test_a_kill_mid_prune_leaves_no_half_checkpoint_and_the_next_start_prunes(tiny_config, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(tiny_config("--training.steps=8", "--checkpoint.interval=2"))  # keep_last = 10: 2, 4, 6, 8
    real_rmtree = shutil.rmtree

    def killed_midway(path, *a, **kw):  # deletes one file, then the process dies
        next(Path(path).glob("*.distcp")).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_lib.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt_lib.prune_checkpoints(run / "checkpoints", keep_last=3, keep_every=0)
    monkeypatch.setattr(ckpt_lib.shutil, "rmtree", real_rmtree)
    assert steps_saved(run) == [4, 6, 8]  # step 2 is no longer a checkpoint, not a broken one
    assert (run / "checkpoints" / "step_00000002.deleting").is_dir()
    trainer = Trainer.from_config(tiny_config("--training.steps=10", "--checkpoint.keep_last=2"))
    assert trainer.step == 8 and steps_saved(run) == [6, 8]  # retention re-applied at start
    assert not (run / "checkpoints" / "step_00000002.deleting").exists()
    trainer.lock.release()


@pytest.mark.parametrize("kind", ["ENOSPC", "torch.save's bare error on a full disk"])
def test_a_full_disk_is_reported_with_the_device_and_path_and_the_tmp_removed(kind, tiny_config, tmp_path,
                                                                              monkeypatch):
    run = tmp_path / "run"
    train(tiny_config("--training.steps=4"))
    real_save = ckpt_lib.dcp.save

    def full(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)
        if kind == "ENOSPC":
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(ckpt_lib.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1408 vs 1302")

    monkeypatch.setattr(ckpt_lib.dcp, "save", full)
    with pytest.raises(UserError, match=r"no space left on .* while writing .*step_00000008\.tmp \(removed\)"):
        train(tiny_config("--training.steps=8"))
    assert not (run / "checkpoints" / "step_00000008.tmp").exists()
    assert steps_saved(run) == [4] and not (run / ckpt_lib.LOCK_FILE).exists()


# ---- metrics.jsonl -------------------------------------------------------------------------------------------
def test_a_torn_last_metrics_line_is_dropped_for_resume_and_plot(tiny_config, tmp_path):
    from moecpt.cli import main

    run = tmp_path / "run"
    train(tiny_config("--training.steps=4", "--checkpoint.interval=2"))
    trace = losses(run)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 10.1, "lb_lo')  # the crash came mid-write
    with pytest.warns(UserWarning, match=r"metrics.jsonl:\d+: dropped a torn last line"):
        assert losses(run) == trace
    with pytest.warns(UserWarning, match="torn last line"):
        assert main(["plot", str(run)]) == 0
    with pytest.warns(UserWarning, match="torn last line"):
        train(tiny_config("--training.steps=6", "--checkpoint.interval=2"))
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4, 5, 6]  # no warning now: the resumed run rewrote the file
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:2] + ['{"step": 3, "lo'] + lines[3:]) + "\n")
    with pytest.raises(UserError, match=r"metrics.jsonl:3: not a JSON record .*delete that line"):
        read_metrics(run)
