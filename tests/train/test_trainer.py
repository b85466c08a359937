"""The training loop on real (small) corpora: determinism, exact resume after kill -9, atomic checkpoints,
accumulation invariance, init_from and export, stability guards and signals."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moecpt.errors import UserError
from moecpt.train import checkpoint as ckpt_lib
from moecpt.train.metrics import read_metrics
from moecpt.train.trainer import Trainer, train

REPO = Path(__file__).resolve().parents[2]


def losses(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt_lib.load_model(ckpt_lib.find_checkpoint(run_dir)).state_dict()


def test_same_seed_gives_the_same_loss_trace(tiny_config, tmp_path):
    a = train(tiny_config(f"--run_dir={tmp_path / 'a'}", "--training.steps=4"))
    b = train(tiny_config(f"--run_dir={tmp_path / 'b'}", "--training.steps=4"))
    assert a["reason"] == b["reason"] == "finished"
    trace = losses(tmp_path / "a")
    assert len(trace) == 4 and trace == losses(tmp_path / "b")
    assert trace[-1][1] < trace[0][1]  # it learns
    c = train(tiny_config(f"--run_dir={tmp_path / 'c'}", "--training.steps=4", "--training.seed=8"))
    assert c["reason"] == "finished" and losses(tmp_path / "c") != trace


def _run_cli(cfg_path: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "moecpt.train", "--config", str(cfg_path), *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(s >= step for s, _ in losses(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early:\n{proc.stdout.read()}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def test_kill_9_and_resume_reproduces_the_uninterrupted_run(write_config, tmp_path):
    cfg = write_config()
    steps = "--training.steps=40"  # enough steps after the kill point that the kill lands before the end
    whole = tmp_path / "whole"
    proc = _run_cli(cfg, f"--run_dir={whole}", steps)
    assert proc.wait(timeout=300) == 0, proc.stdout.read()

    cut = tmp_path / "cut"
    kill_at = random.Random(os.getpid()).randint(5, 25)  # after the step-4 checkpoint at the earliest
    proc = _run_cli(cfg, f"--run_dir={cut}", steps)
    _wait_for_step(cut, proc, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert losses(cut)[-1][0] < 40, "the run ended before it could be killed"
    proc = _run_cli(cfg, f"--run_dir={cut}", steps)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    assert "resumed from" in out

    assert losses(cut) == losses(whole)  # the same trace, each step once
    a, b = final_weights(whole), final_weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_crash_while_saving_keeps_the_previous_checkpoint(tiny_config, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(tiny_config("--training.steps=4"))  # checkpoint at step 4
    real_save = ckpt_lib.dcp.save

    def dying_save(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)  # the files are written ...
        raise OSError("disk full")  # ... but the process dies before the checkpoint is marked complete

    monkeypatch.setattr(ckpt_lib.dcp, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        train(tiny_config("--training.steps=8"))
    assert (run / "checkpoints" / "step_00000008.tmp").is_dir()
    assert ckpt_lib.latest_checkpoint(run / "checkpoints").name == "step_00000004"

    monkeypatch.undo()
    trainer = Trainer.from_config(tiny_config("--training.steps=8"))
    assert trainer.step == 4 and "step_00000004" in trainer.start_mode
    trainer.train()
    assert not (run / "checkpoints" / "step_00000008.tmp").exists()
    assert [s for s, _ in losses(run)] == list(range(1, 9))


def test_loss_does_not_depend_on_the_micro_batch_split(tiny_config, tmp_path):
    # Without the (per-micro-batch) load-balancing term, the update is exactly the global-batch mean.
    no_aux = ("--model.overrides.router_aux_loss_coef=0.0", "--training.steps=3", "--training.global_batch=8")
    train(tiny_config(f"--run_dir={tmp_path / 'm8'}", "--training.micro_batch=8", *no_aux))
    train(tiny_config(f"--run_dir={tmp_path / 'm2'}", "--training.micro_batch=2", *no_aux))
    a, b = losses(tmp_path / "m8"), losses(tmp_path / "m2")
    for (s1, l1), (s2, l2) in zip(a, b, strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-5)
    wa, wb = final_weights(tmp_path / "m8"), final_weights(tmp_path / "m2")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def test_init_from_transformers_then_export_loads_in_transformers(tiny_config, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.MixtralConfig(vocab_size=32000, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=256)
    base = transformers.MixtralForCausalLM(hf_cfg)
    base.save_pretrained(tmp_path / "base")

    result = train(tiny_config(f"--init_from={tmp_path / 'base'}", "--training.steps=3",
                               "--checkpoint.export_at_end=true", "--model.overrides.router_aux_loss_coef=0.02"))
    assert "initialised from" in json.dumps(result) or result["reason"] == "finished"
    first = read_metrics(tmp_path / "run")[0]
    assert first["step"] == 1 and first["samples_consumed"] == 4  # fresh data position

    out = Path(result["export"])
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= {p.name for p in out.iterdir()}
    reloaded, info = transformers.MixtralForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # Training changed the weights, and the export holds the trained ones.
    trained = load_file(str(out / "model.safetensors"))
    assert not torch.equal(trained["model.layers.0.self_attn.q_proj.weight"],
                           base.state_dict()["model.layers.0.self_attn.q_proj.weight"])
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("吾輩は猫である", return_tensors="pt").input_ids
    assert ids[0, 0].item() == 1  # BOS added, as Mixtral prompts start
    gen = reloaded.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 4


def test_export_command_writes_the_latest_checkpoint(tiny_config, tmp_path):
    from moecpt.cli import main

    train(tiny_config("--training.steps=4"))
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    weights = final_weights(tmp_path / "run")
    assert torch.equal(exported["model.embed_tokens.weight"], weights["embed_tokens.weight"])


def test_nonfinite_steps_are_skipped_then_the_run_stops_without_a_checkpoint(tiny_config, tmp_path, monkeypatch):
    trainer = Trainer.from_config(tiny_config("--training.max_nonfinite_in_a_row=2", "--checkpoint.interval=0"))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    original = trainer.model.forward

    def poisoned(*a, **kw):
        out = original(*a, **kw)
        out.token_loss = out.token_loss * float("nan")
        return out

    monkeypatch.setattr(trainer.model, "forward", poisoned)
    result = trainer.train()
    assert result["reason"] == "2 non-finite steps in a row"
    assert trainer.nonfinite_total == 2 and trainer.step == 2
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())  # no update applied
    # No checkpoint of a streak (tests/train/test_robustness.py): the stop is recorded for the next run instead.
    assert ckpt_lib.latest_checkpoint(tmp_path / "run" / "checkpoints") is None and result["checkpoint"] is None
    assert ckpt_lib.read_stop_record(tmp_path / "run").in_a_row == 2
    assert [r["skipped"] for r in read_metrics(tmp_path / "run")] == [True, True]


def test_sigterm_saves_a_checkpoint_and_the_rerun_finishes(write_config, tmp_path):
    cfg = write_config()
    run = tmp_path / "run"
    proc = _run_cli(cfg, "--checkpoint.interval=0", "--training.steps=200")
    _wait_for_step(run, proc, 2)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert "checkpoint saved" in out
    stopped_at = ckpt_lib.read_trainer_state(ckpt_lib.latest_checkpoint(run / "checkpoints"))["step"]
    assert 2 <= stopped_at < 200
    assert losses(run)[-1][0] == stopped_at


def test_metrics_and_console_report_what_the_issue_promises(tiny_config, tmp_path, capsys):
    train(tiny_config("--training.steps=2", "--logging.val_interval=1"))
    out = capsys.readouterr().out
    assert "step 1/2 | loss" in out and "tok/s" in out and "ETA" in out and "experts max/mean" in out
    assert 'mixture = "0.7 ja 0.3 en"' in out  # the resolved config is printed
    assert (tmp_path / "run" / "config.toml").is_file()
    records = read_metrics(tmp_path / "run")
    first = records[0]
    for key in ("step", "loss", "lb_loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "model_tflops",
                "loss/ja", "loss/en", "expert_load_max", "expert_idle", "val_bpb/ja", "val_bpb/en"):
        assert key in first, key
    assert 0 < first["val_bpb/ja"] < 20 and len(first["expert_load_max"]) == 2


def test_config_errors_name_the_key(tiny_config, write_config):
    from moecpt.config import load_config

    with pytest.raises(UserError, match="unknown key training.stepz; did you mean training.steps"):
        tiny_config("--training.stepz=3")
    with pytest.raises(UserError, match="training.steps must be int, got 'ten'"):
        tiny_config("--training.steps=ten")
    with pytest.raises(UserError, match="optimizer.min_lr must be between 0 and optimizer.lr"):
        tiny_config("--optimizer.min_lr=1.0")
    bad = write_config("\n[trainning]\nsteps = 3\n", name="bad.toml")
    with pytest.raises(UserError, match="bad.toml: unknown key trainning; did you mean training"):
        load_config(bad)
    with pytest.raises(UserError, match="training.global_batch .6. must be a multiple"):
        Trainer.from_config(tiny_config("--training.global_batch=6", "--training.micro_batch=4"))
    with pytest.raises(UserError, match="unknown model.overrides key.s. num_layers"):
        Trainer.from_config(tiny_config("--model.overrides.num_layers=3"))


def test_resume_refuses_a_changed_mixture_unless_a_new_stage_is_asked_for(tiny_config, tmp_path):
    train(tiny_config("--training.steps=4"))
    with pytest.raises(UserError, match="mixture changed"):
        Trainer.from_config(tiny_config("--training.steps=6", "--data.mixture=0.5 ja 0.5 en"))
    t = Trainer.from_config(tiny_config("--training.steps=6", "--data.mixture=0.5 ja 0.5 en", "--data.new_stage=true"))
    assert t.step == 4 and t.loader.state.stage_start == 16


def test_resolved_config_round_trips(tiny_config, tmp_path):
    from moecpt.config import load_config, to_toml

    cfg = tiny_config("--training.steps=5")
    (tmp_path / "resolved.toml").write_text(to_toml(cfg))
    assert load_config(tmp_path / "resolved.toml") == cfg


def test_swallow_recipe_config_holds_the_published_hyperparameters():
    from moecpt.config import load_config

    cfg = load_config(REPO / "configs" / "swallow-mx-8x7b.toml")
    o, s, t = cfg.optimizer, cfg.schedule, cfg.training
    assert (o.lr, o.min_lr, o.beta1, o.beta2, o.weight_decay, o.grad_clip) == (2e-5, 2e-6, 0.9, 0.95, 0.1, 1.0)
    assert (s.warmup_steps, s.decay) == (1000, "cosine")
    assert (t.steps, t.global_batch, cfg.data.seq_len) == (25000, 1024, 4096)
    assert t.steps * t.global_batch * cfg.data.seq_len == pytest.approx(104.9e9, rel=0.01)
    assert cfg.data.mixture.split()[::2] == ["0.644", "0.256", "0.1"]


def test_plot_draws_the_figures_of_a_run(tiny_config, tmp_path):
    from moecpt.cli import main

    train(tiny_config("--training.steps=3", "--logging.val_interval=1"))
    assert main(["plot", str(tmp_path / "run")]) == 0
    made = {p.name for p in (tmp_path / "run" / "plots").iterdir()}
    assert made == {"loss.png", "lb_loss.png", "lr.png", "val_bpb.png", "expert_load.png", "expert_imbalance.png"}
    assert all((tmp_path / "run" / "plots" / n).read_bytes()[:4] == b"\x89PNG" for n in made)
    with pytest.raises(UserError, match="no training records"):
        from moecpt.report.plots import plot_run

        plot_run(tmp_path)


def test_init_from_refuses_overrides_that_change_its_shape(tiny_config, tmp_path):
    train(tiny_config("--training.steps=2"))
    ckpt = ckpt_lib.latest_checkpoint(tmp_path / "run" / "checkpoints")
    t = Trainer.from_config(tiny_config(f"--init_from={ckpt}", f"--run_dir={tmp_path / 'next'}"))
    assert t.step == 0 and "initialised from" in t.start_mode
    same = final_weights(tmp_path / "run")
    assert all(torch.equal(same[k], v) for k, v in t.model.state_dict().items())
    with pytest.raises(UserError, match="num_hidden_layers=3 would change the shape"):
        Trainer.from_config(tiny_config(f"--init_from={ckpt}", "--model.overrides.num_hidden_layers=3"))


def test_the_shipped_tiny_config_trains_on_the_shared_corpora(shared_data, tmp_path, monkeypatch):
    from moecpt.cli import main

    monkeypatch.chdir(REPO)  # its corpus paths are relative to the repository root, as in the README
    argv = ["train", "--config", "configs/tiny.toml", f"--run_dir={tmp_path / 'run'}", "--training.steps=2",
            "--logging.progress=false", f"--data.cache_dir={tmp_path / 'cache'}", "--checkpoint.export_at_end=false"]
    assert main(argv) == 0
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records if "loss" in r] == [2]
    assert {"loss/ja", "loss/en", "loss/code"} <= set(records[0])


def test_resume_refuses_a_model_of_another_shape(tiny_config):
    train(tiny_config("--training.steps=2"))
    with pytest.raises(UserError, match="num_hidden_layers 2 in the checkpoint, 1 in the config"):
        Trainer.from_config(tiny_config("--training.steps=4", "--model.overrides.num_hidden_layers=1"))
    # A loss coefficient is not a shape: it may change on resume.
    assert Trainer.from_config(tiny_config("--training.steps=4", "--model.overrides.router_aux_loss_coef=0.05")).step == 2


def test_resuming_from_an_earlier_checkpoint_abandons_the_later_ones(tiny_config, tmp_path):
    run = tmp_path / "run"
    train(tiny_config("--training.steps=8"))  # checkpoints at steps 4 and 8
    early = run / "checkpoints" / "step_00000004"
    train(tiny_config(f"--resume={early}", "--training.steps=6"))
    assert ckpt_lib.latest_checkpoint(run / "checkpoints").name == "step_00000006"
    assert (run / "checkpoints" / "abandoned" / "step_00000008" / "COMPLETE").is_file()  # kept, out of the way
    t = Trainer.from_config(tiny_config("--training.steps=7"))  # resume = auto
    assert t.step == 6
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4, 5, 6]


def test_validation_runs_at_its_own_interval(tiny_config, tmp_path):
    train(tiny_config("--training.steps=5", "--logging.interval=2", "--logging.val_interval=3"))
    records = read_metrics(tmp_path / "run")
    with_val = [r["step"] for r in records if "val_bpb/ja" in r]
    assert with_val == [3, 5]  # step 3 (its own record) and the end of the run
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 5]
    with pytest.raises(UserError, match="training.max_nonfinite_in_a_row must be >= 1"):
        tiny_config("--training.max_nonfinite_in_a_row=0")
