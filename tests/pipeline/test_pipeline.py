"""`moecpt run`: the whole study from a recipe, on the shared corpora and on the built-in ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moecpt.cli import main
from moecpt.errors import UserError
from moecpt.pipeline.builtin import write_builtin_corpora
from moecpt.pipeline.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]
TINY = ["--train.model.overrides={hidden_size = 32, intermediate_size = 64, num_hidden_layers = 2, "
        "num_attention_heads = 4, num_key_value_heads = 2}",
        "--train.data.seq_len=64", "--train.training.global_batch=8", "--train.training.micro_batch=8",
        "--train.logging.interval=10", "--train.checkpoint.interval=0", "--train.schedule.warmup_steps=5"]


def _jsonl(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_builtin_corpora_are_reproducible_and_hold_out_unseen_documents(tmp_path):
    a = write_builtin_corpora(tmp_path / "a", ja_docs=200, math_docs=100)
    b = write_builtin_corpora(tmp_path / "b", ja_docs=200, math_docs=100)
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes(), name
    for name in ("ja", "en", "code", "math"):
        train, held = set(_jsonl(a[name])), set(_jsonl(a[f"{name}_heldout"]))
        assert train and held and not train & held, name
    ja = _jsonl(a["ja"])
    assert sum(any("\u3040" <= ch <= "\u30ff" for ch in t) for t in ja) == len(ja)  # kana in every document
    assert any("答えは" in t for t in ja) and all("#### " in t for t in _jsonl(a["math"])[::2])


@pytest.mark.slow
def test_shared_recipe_improves_japanese_and_reports_it(shared_data, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the recipe's corpus paths are relative to the repository root
    run = tmp_path / "study"
    argv = ["run", "recipes/mini-shared.toml", "--run-dir", str(run), *TINY, "--base.training.steps=40",
            "--cpt.training.steps=40", "--eval.tasks=jcom,mgsm", "--eval.limit=3"]
    assert main(argv) == 0
    summary = json.loads((run / "summary.json").read_text())
    ja, en = summary["heldout_bpb"]["ja"], summary["heldout_bpb"]["en"]
    assert ja["cpt"] < ja["base"]  # continual pre-training on Japanese lowers Japanese held-out loss
    assert en["base"] > 0 and en["cpt"] > 0
    assert set(summary["eval"]["cpt"]["tasks"]) == {"jcom", "mgsm"}
    assert summary["eval"]["cpt"]["tasks"]["jcom"]["n"] == 3
    shares = {r["name"]: r["share"] for r in summary["training"]["cpt"]["mixture_report"]}
    assert shares == pytest.approx({"ja": 0.644, "en": 0.256, "code": 0.1}, abs=0.01)

    report = (run / "report.md").read_text()
    assert "| ja |" in report and "JCom." in report and "continually pre-trained" in report
    for fig in ("heldout_bpb.png", "cpt/loss.png", "cpt/lb_loss.png", "cpt/lr.png", "base/loss.png"):
        assert (run / "figures" / fig).is_file(), fig
    assert (run / "hf" / "model.safetensors").is_file() and (run / "hf" / "tokenizer.model").is_file()

    # A rerun finds every stage complete and trains nothing again.
    before = (run / "cpt" / "metrics.jsonl").read_text()
    assert main(argv) == 0
    assert (run / "cpt" / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_embedded_default_runs_without_shared_data_and_resumes_after_a_crash(tmp_path, monkeypatch):
    from moecpt.pipeline import run as run_mod

    run = tmp_path / "mini"
    argv = ["run", "--run-dir", str(run), *TINY, "--base.training.steps=6", "--cpt.training.steps=6",
            "--eval.data_dir=none", "--eval.limit=5"]

    def crash(self, *a, **kw):
        raise RuntimeError("power cut during evaluation")

    monkeypatch.setattr(run_mod.Pipeline, "stage_eval", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        main(argv)
    assert {p.stem for p in (run / "stages").glob("*.json")} == {"corpora", "base", "cpt"}
    trained = (run / "cpt" / "metrics.jsonl").read_text()

    monkeypatch.undo()
    assert main(argv) == 0
    assert (run / "cpt" / "metrics.jsonl").read_text() == trained  # training was not repeated
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["heldout_bpb"]) == {"ja", "en"}
    assert summary["eval"]["cpt"]["tasks"] == {}
    assert "No benchmark task ran" in (run / "report.md").read_text()
    assert main(["report", str(run)]) == 0  # the report can be rewritten on its own


def test_recipes_in_the_repository_are_valid():
    for path in [None, REPO / "recipes" / "mini-shared.toml", REPO / "recipes" / "swallow-mx-8x7b.toml"]:
        recipe = load_recipe(path)
        corpora = {k: ["x"] for k in recipe.corpora}
        cpt = recipe.stage_config("cpt", corpora, init_from="somewhere")
        assert cpt.data.mixture == "0.644 ja 0.256 en 0.1 code"
        if recipe.base is not None:
            assert recipe.stage_config("base", corpora).training.steps > 0
    full = load_recipe(REPO / "recipes" / "swallow-mx-8x7b.toml").stage_config("cpt", {"ja": [], "en": [], "code": []})
    t = full.training
    assert (full.optimizer.lr, full.optimizer.min_lr, t.steps, t.global_batch, full.data.seq_len) == (
        2e-5, 2e-6, 25000, 1024, 4096)


def test_recipe_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[corpora]\nja = "a"\n[cpt]\nmixture = "1 ja"\n[trian]\n')
    with pytest.raises(UserError, match="unknown key.s. trian"):
        load_recipe(bad)
    bad.write_text('name = "x"\n[corpora]\nja = "a"\n[cpt]\nmixture = "1 ja"\n')
    with pytest.raises(UserError, match="init_from = \"base\" but the recipe has no \\[base\\] stage"):
        load_recipe(bad)
    bad.write_text('name = "x"\n[corpora]\nja = "a"\n[cpt]\ninit_from = "hf"\n')
    with pytest.raises(UserError, match=r"\[cpt\] needs a mixture"):
        load_recipe(bad)
    bad.write_text('name = "x"\n[corpora]\nja = "a"\n[cpt]\ninit_from = "hf"\nmixture = "1 ja"\n[train.training]\nsteps = "many"\n')
    with pytest.raises(UserError, match="training.steps must be int"):
        load_recipe(bad).stage_config("cpt", {"ja": ["a"]})


def test_print_config_gives_a_training_config_for_torchrun(tmp_path, capsys, monkeypatch):
    from moecpt.config import load_config

    assert main(["run", "--run-dir", str(tmp_path / "r"), "--print-config", "cpt", "--cpt.training.steps=7"]) == 0
    (tmp_path / "cpt.toml").write_text(capsys.readouterr().out)
    cfg = load_config(tmp_path / "cpt.toml")
    assert cfg.training.steps == 7 and cfg.run_dir == str(tmp_path / "r" / "cpt")
    assert cfg.init_from == str(tmp_path / "r" / "base" / "hf")
    assert cfg.data.mixture == "0.644 ja 0.256 en 0.1 code" and cfg.data.corpora["ja"][0].endswith("ja.jsonl")

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["run", "--run-dir", str(tmp_path / "r")]) == 2  # refused with a message, nothing started
    assert "do not start it under torchrun" in capsys.readouterr().err


def test_a_training_stage_run_outside_is_picked_up(tmp_path, capsys):
    """The cluster workflow: train the printed stage config elsewhere, then `moecpt run` continues from it."""
    from moecpt.config import load_config
    from moecpt.train.trainer import train

    run = tmp_path / "r"
    argv = ["run", "--run-dir", str(run), *TINY, "--base.training.steps=3", "--cpt.training.steps=3",
            "--eval.data_dir=none", "--eval.limit=2"]
    assert main([*argv, "--print-config", "base"]) == 0
    printed = capsys.readouterr()
    assert "wrote the built-in corpora" in printed.err  # printing a config that trains on them makes them
    (tmp_path / "base.toml").write_text(printed.out)
    train(load_config(tmp_path / "base.toml"))  # as torchrun -m moecpt.train would
    ckpt = run / "base" / "checkpoints" / "step_00000003"
    stamp = (ckpt / "COMPLETE").stat().st_mtime_ns
    assert main(argv) == 0
    assert (ckpt / "COMPLETE").stat().st_mtime_ns == stamp  # the finished run was reused, not redone
    base_steps = [json.loads(line)["step"] for line in (run / "base" / "metrics.jsonl").read_text().splitlines()]
    assert base_steps.count(3) == 2  # one training record and one validation record for step 3, no more


def test_rerun_from_the_run_directorys_own_recipe_copy(tmp_path):
    run = tmp_path / "r"
    argv = [*TINY, "--base.training.steps=2", "--cpt.training.steps=2", "--eval.data_dir=none", "--eval.limit=1"]
    assert main(["run", "--run-dir", str(run), *argv]) == 0
    assert main(["run", str(run / "recipe.toml"), "--run-dir", str(run), *argv]) == 0
