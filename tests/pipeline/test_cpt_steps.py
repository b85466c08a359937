"""Recipe steps around training: "upcycle a dense model, continue it, then merge", run by `moecpt run` and
reported; recipes whose steps cannot run are refused before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moecpt.cli import main
from moecpt.errors import UserError
from moecpt.pipeline.recipe import load_recipe
from moecpt.tools.merge import model_tensors
from moecpt.train.checkpoint import load_model

from ..tools.dense_models import make_dense

BASE = """
name = "steps"
[corpora]
ja = "{ja}"
en = "{en}"
[heldout]
ja = "{heldout}"
[train.data]
seq_len = 32
valid_fraction = 0.05
valid_max_documents = 4
[train.training]
global_batch = 4
micro_batch = 4
[train.optimizer]
lr = 3e-3
min_lr = 3e-4
[train.schedule]
warmup_steps = 1
[train.checkpoint]
interval = 2
keep_last = 3
[train.logging]
interval = 1
val_interval = 0
val_batches = 1
progress = false
[cpt]
mixture = "0.7 ja 0.3 en"
init_from = "upcycle"
[cpt.training]
steps = 4
[eval]
data_dir = "none"
limit = 2
"""
UPCYCLE = '\n[upcycle]\ndense = "{dense}"\nexperts = 4\ntop_k = 2\ngranularity = 2\n'


def _recipe(tmp_path: Path, corpora: dict[str, list[str]], extra: str, dense: str = "dense") -> Path:
    path = tmp_path / "recipe.toml"
    heldout = tmp_path / "heldout.jsonl"  # two short documents: held-out loss in a second
    heldout.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                               for t in ("吾輩は猫である。名前はまだ無い。", "どこで生れたかとんと見当がつかぬ。")))
    path.write_text(BASE.format(ja=corpora["ja"][0], en=corpora["en"][0], heldout=heldout)
                    + UPCYCLE.format(dense=tmp_path / dense) + extra)
    return path


def test_upcycle_then_train_then_average_the_last_checkpoints(tmp_path, tiny_corpora):
    make_dense("llama", tmp_path / "dense", vocab_size=32000, max_position_embeddings=256)
    recipe = _recipe(tmp_path, tiny_corpora, "\n[merge]\naverage_last = 2\n")
    run = tmp_path / "run"
    assert main(["run", str(recipe), "--run-dir", str(run)]) == 0
    stages = {p.stem for p in (run / "stages").glob("*.json")}
    assert stages == {"corpora", "upcycle", "cpt", "merge", "eval", "export", "report"}

    summary = json.loads((run / "summary.json").read_text())
    up, mg = summary["steps"]["upcycle"], summary["steps"]["merge"]
    assert (up["family"], up["experts"], up["granularity"], up["group"]) == ("mixtral", 4, 2, 2)
    assert [Path(t["model"]).name for t in mg["terms"]] == ["step_00000002", "step_00000004"]
    # the exported model is the exact average of the two checkpoints
    a, b = (model_tensors(load_model(t["model"])) for t in mg["terms"])
    out = model_tensors(load_model(run / "hf"))
    for name, t in out.items():
        assert torch.equal(t, (0.5 * a[name].double() + 0.5 * b[name].double()).float()), name
    # the upcycled model trained (experts and router moved) and exported as a Mixtral transformers loads
    transformers = pytest.importorskip("transformers")
    exported = transformers.MixtralForCausalLM.from_pretrained(run / "hf", dtype=torch.float32).state_dict()
    start = transformers.MixtralForCausalLM.from_pretrained(run / "upcycled", dtype=torch.float32).state_dict()
    moved = {n.split(".")[-2] for n, t in exported.items() if not torch.equal(t, start[n])}
    assert {"gate", "experts", "q_proj", "embed_tokens"} <= moved, moved
    assert summary["eval"]["base"]["model"] == str(run / "upcycled")
    assert summary["eval"]["cpt"]["model"] == str(run / "merged")
    assert summary["heldout_bpb"]["ja"]["cpt"] < summary["heldout_bpb"]["ja"]["base"]
    report = (run / "report.md").read_text()
    assert "## Upcycling (`upcycle`)" in report and "virtual groups of 2" in report
    assert "## Merge (`merge`)" in report and "+0.5 x" in report and "step_00000004" in report

    (run / "report.md").unlink()
    assert main(["report", str(run)]) == 0  # `moecpt report` alone writes the same report, steps included
    assert (run / "report.md").read_text() == report
    assert json.loads((run / "summary.json").read_text())["steps"] == summary["steps"]
    assert main(["run", str(recipe), "--run-dir", str(run)]) == 0  # a rerun: every step complete, steps reported
    assert "## Merge (`merge`)" in (run / "report.md").read_text()


@pytest.mark.parametrize(("extra", "cpt_init", "message"), [
    ("", "base", r"an \[upcycle\] step but \[cpt\] init_from = 'base'"),
    ("\n[merge]\naverage_last = 4\n", "upcycle", r"average_last = 4 needs .* keep_last >= 4 \(now 3\)"),
    ("\n[merge]\naverage_last = 2\naverage = [\"cpt\", \"x\"]\n", "upcycle",
     r"exactly one of average_last, average or task_vector, got average_last, average"),
    ("\n[merge]\nembeddings = \"skip\"\n", "upcycle", "exactly one of .* got none"),
    ("\n[merge]\ntask_vector = { plus = \"a\" }\n", "upcycle", "task_vector needs plus and minus"),
    ("\n[merge]\naverage = [\"cpt\"]\nweight = [1]\n", "upcycle", r"unknown key merge.weight; did you mean merge.weights"),
])
def test_recipe_steps_are_checked_before_anything_runs(tmp_path, tiny_corpora, extra, cpt_init, message):
    path = _recipe(tmp_path, tiny_corpora, extra)
    path.write_text(path.read_text().replace('init_from = "upcycle"', f'init_from = "{cpt_init}"'))
    if cpt_init == "base":
        path.write_text(path.read_text() + '\n[base]\nmixture = "1 en"\n')
    with pytest.raises(UserError, match=message):
        load_recipe(path)


def test_upcycle_init_without_an_upcycle_step_is_refused(tmp_path, tiny_corpora):
    path = tmp_path / "r.toml"
    path.write_text(BASE.format(ja=tiny_corpora["ja"][0], en=tiny_corpora["en"][0], heldout="unused"))
    with pytest.raises(UserError, match=r"init_from = \"upcycle\" but the recipe has no \[upcycle\] step"):
        load_recipe(path)
    path.write_text(path.read_text() + '\n[upcycle]\nfamily = "mixtral"\n')
    with pytest.raises(UserError, match=r"\[upcycle\] needs dense ="):
        load_recipe(path)


def test_print_config_of_an_upcycled_cpt_stage_points_at_the_upcycled_model(tmp_path, tiny_corpora, capsys):
    recipe = _recipe(tmp_path, tiny_corpora, "")
    assert main(["run", str(recipe), "--run-dir", str(tmp_path / "r"), "--print-config", "cpt"]) == 0
    assert f'init_from = "{tmp_path / "r" / "upcycled"}"' in capsys.readouterr().out
