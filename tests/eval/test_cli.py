"""`moecpt eval` end to end on a tiny random Mixtral with --limit: valid (near-zero) scores, the files the
interface promises, a rerun that continues instead of redoing, a comparison column, clear errors."""

from __future__ import annotations

import json

import pytest

from moecpt.cli import main

pytest.importorskip("torch")


def _run(capsys, *args) -> tuple[int, str, str]:
    rc = main(["eval", *map(str, args), "--no-progress"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_eval_end_to_end_then_resume_and_compare(tmp_path, eval_data, tiny_model_dir, capsys):
    out = tmp_path / "run"
    heldout = eval_data.parent / "corpus/ja/wikipedia_dev.jsonl"
    args = ["--model", tiny_model_dir, "--tasks", "jcom,jemhopqa,mgsm,wmt20_ja_en", "--data-dir", eval_data,
            "--output", out, "--limit", 2, "--heldout", f"ja_wiki={heldout}", "--name", "tiny"]
    rc, stdout, _ = _run(capsys, *args)
    assert rc == 0
    results = json.loads((out / "results.json").read_text("utf-8"))
    assert set(results["tasks"]) == {"jcom", "jemhopqa", "mgsm", "wmt20_ja_en"}
    for entry in results["tasks"].values():
        assert entry["n"] == 2 and 0.0 <= entry["score"] <= 1.0
    assert results["average"] == pytest.approx(sum(e["score"] for e in results["tasks"].values()) / 4)
    bpb = results["heldout"]["ja_wiki"]["bits_per_byte"]
    assert 1.0 < bpb < 20.0  # a random model over 32,000 tokens: far from zero, finite
    table = (out / "results.md").read_text("utf-8")
    assert "| Model | JCom. | JEMHopQA | MGSM | WMT20 (ja-en) | Ja avg |" in table and "| tiny |" in table
    assert "| Model | JCom." in stdout
    preds = {t: (out / f"predictions/{t}.jsonl").read_text("utf-8") for t in results["tasks"]}
    assert all(len(p.splitlines()) == 2 for p in preds.values())

    # the same command again: every prediction is reused, the scores are identical
    rc, _, _ = _run(capsys, *args)
    assert rc == 0
    assert {t: (out / f"predictions/{t}.jsonl").read_text("utf-8") for t in preds} == preds
    again = json.loads((out / "results.json").read_text("utf-8"))
    assert again["tasks"] == results["tasks"]

    # a larger --limit continues from the items already there
    more = [a if a != "jcom,jemhopqa,mgsm,wmt20_ja_en" else "jcom" for a in args[:-6]]
    rc, _, _ = _run(capsys, *more, "--limit", 3, "--heldout", "none", "--name", "tiny")
    assert len((out / "predictions/jcom.jsonl").read_text("utf-8").splitlines()) == 3
    assert (out / "predictions/jcom.jsonl").read_text("utf-8").startswith(preds["jcom"])

    # a second model, compared with the first
    rc, stdout, _ = _run(capsys, "--model", tiny_model_dir, "--tasks", "jcom", "--data-dir", eval_data,
                         "--output", tmp_path / "other", "--limit", 2, "--heldout", "none", "--name", "other",
                         "--compare", out / "results.json")
    assert rc == 0
    assert "| tiny |" in stdout and "| other |" in stdout and "## other vs tiny" in stdout


def test_missing_task_data_exits_1_and_runs_the_rest(tmp_path, eval_data, tiny_model_dir, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("llm_jp_eval_v1_tasks.json", "jp_harness_9b42d41_tasks.json", "jcommonsenseqa"):
        (data / name).symlink_to(eval_data / name)
    rc, stdout, err = _run(capsys, "--model", tiny_model_dir, "--tasks", "jcom,niilc", "--data-dir", data,
                           "--output", tmp_path / "out", "--limit", 1, "--heldout", "none")
    assert rc == 1
    assert "task niilc: data file not found" in err and "NIILC-ECQA2015_test.xml" in err
    results = json.loads((tmp_path / "out/results.json").read_text("utf-8"))
    assert list(results["tasks"]) == ["jcom"] and "niilc" in results["skipped"]


def test_user_errors(tmp_path, eval_data, capsys):
    rc, _, err = _run(capsys, "--model", tmp_path / "nope", "--suite", "ja", "--data-dir", eval_data,
                      "--output", tmp_path / "o")
    assert rc == 2 and "not a directory" in err
    rc, _, err = _run(capsys, "--model", tmp_path, "--tasks", "jcom,bogus", "--data-dir", eval_data,
                      "--output", tmp_path / "o")
    assert rc == 2 and "unknown task(s) bogus" in err
    rc, _, err = _run(capsys, "--model", tmp_path, "--data-dir", eval_data, "--output", tmp_path / "o")
    assert rc == 2 and "no config.json" in err


def test_interrupted_run_continues(tmp_path, eval_data, tiny_model_dir, capsys, monkeypatch):
    from moecpt.eval.lm import ModelLM

    real = ModelLM.complete
    calls = []

    def crash_on_second_batch(self, requests):
        calls.append(len(requests))
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(self, requests)

    args = ["--model", tiny_model_dir, "--tasks", "jcom", "--data-dir", eval_data, "--output", tmp_path / "o",
            "--limit", 3, "--batch-size", 1, "--heldout", "none"]
    monkeypatch.setattr(ModelLM, "complete", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        _run(capsys, *args)
    kept = (tmp_path / "o/predictions/jcom.jsonl").read_text("utf-8")
    assert len(kept.splitlines()) == 1 and not (tmp_path / "o/results.json").exists()

    monkeypatch.setattr(ModelLM, "complete", real)
    rc, _, _ = _run(capsys, *args)
    assert rc == 0
    done = (tmp_path / "o/predictions/jcom.jsonl").read_text("utf-8")
    assert done.startswith(kept) and len(done.splitlines()) == 3
    assert json.loads((tmp_path / "o/results.json").read_text("utf-8"))["tasks"]["jcom"]["n"] == 3


def test_remaining_tasks_end_to_end(tmp_path, eval_data, tiny_model_dir, capsys):
    """The tasks the first test leaves out, one item each: ROUGE over the model's tokenizer pieces, BLEU over
    nagisa words, GSM8K, and the two long-output llm-jp-eval tasks (every item of every task goes through the
    scoring path in test_full_data.py)."""
    rc, stdout, _ = _run(capsys, "--model", tiny_model_dir, "--suite", "all", "--tasks",
                         "xlsum,wmt20_en_ja,gsm8k,niilc,jsquad", "--data-dir", eval_data, "--output", tmp_path,
                         "--limit", 1, "--heldout", "none")
    assert rc == 0
    results = json.loads((tmp_path / "results.json").read_text("utf-8"))
    assert {t: r["n"] for t, r in results["tasks"].items()} == {
        "xlsum": 1, "wmt20_en_ja": 1, "gsm8k": 1, "niilc": 1, "jsquad": 1}
    assert all(0.0 <= r["score"] <= 1.0 for r in results["tasks"].values())
    assert results["average_en"] == results["tasks"]["gsm8k"]["score"]
    assert "| GSM8K | En avg |" in stdout


def test_weights_reexported_into_the_same_directory_are_another_model(tmp_path, eval_data, capsys):
    import torch

    from moecpt.model import MixtralForCausalLM
    from moecpt.model.config import MixtralConfig

    model_dir = tmp_path / "hf"
    torch.manual_seed(1)
    MixtralForCausalLM(MixtralConfig.from_preset("tiny")).save_pretrained(model_dir)
    args = ["--model", model_dir, "--tasks", "jcom", "--data-dir", eval_data, "--output", tmp_path / "ev",
            "--limit", 1, "--heldout", "none"]
    assert _run(capsys, *args)[0] == 0
    torch.manual_seed(2)  # retrained weights of the same shape, exported to the same place
    MixtralForCausalLM(MixtralConfig.from_preset("tiny")).save_pretrained(model_dir)
    rc, _, err = _run(capsys, *args)
    assert rc == 2 and "holds predictions of a different run (model differ)" in err


def test_missing_package_fails_before_the_model_loads(tmp_path, eval_data, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "nagisa", None)  # as if the eval extra were not installed
    rc, _, err = _run(capsys, "--model", tmp_path / "not-loaded-yet", "--tasks", "jcom,wmt20_en_ja",
                      "--data-dir", eval_data, "--output", tmp_path / "o")
    assert rc == 2 and "nagisa (for wmt20_en_ja)" in err and "pip install 'moecpt[eval]'" in err
    assert not (tmp_path / "o").exists()


def test_pipeline_checks_eval_packages_before_the_first_stage(tmp_path, eval_data, monkeypatch):
    import sys

    from moecpt.errors import UserError
    from moecpt.pipeline.recipe import load_recipe
    from moecpt.pipeline.run import Pipeline

    monkeypatch.setitem(sys.modules, "rapidfuzz", None)
    run_dir = tmp_path / "study"
    recipe = load_recipe(None, str(run_dir), [f"--eval.data_dir={eval_data}", "--eval.tasks=jcom,niilc"])
    with pytest.raises(UserError, match=r"rapidfuzz \(for niilc\).*moecpt\[eval\]"):
        Pipeline(recipe).run()
    assert not (run_dir / "stages").exists() and not (run_dir / "corpus").exists()
    # held-out loss only (no evaluation data): nothing to check, the packages are not needed
    recipe = load_recipe(None, str(run_dir), ["--eval.data_dir=none", "--eval.tasks=jcom,niilc"])
    Pipeline(recipe).check_eval_requirements()


def test_evaluate_model_is_the_python_entry(tmp_path, eval_data, tiny_model_dir):
    from moecpt.eval.runner import evaluate_model

    res = evaluate_model(tiny_model_dir, tmp_path / "o", data_dir=eval_data, tasks="jcom,jemhopqa", limit=2,
                         heldout="none", name="tiny", progress=False, max_length=512)
    assert {t: r["n"] for t, r in res["tasks"].items()} == {"jcom": 2, "jemhopqa": 2}
    assert json.loads((tmp_path / "o/results.json").read_text("utf-8"))["tasks"] == res["tasks"]
    assert "| tiny |" in (tmp_path / "o/results.md").read_text("utf-8")


def test_pipeline_evaluates_through_evaluate_model(tmp_path, eval_data, tiny_model_dir, monkeypatch):
    from moecpt.eval import runner
    from moecpt.pipeline.recipe import load_recipe
    from moecpt.pipeline.run import Pipeline

    calls = []
    real = runner.evaluate_model
    monkeypatch.setattr(runner, "evaluate_model", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    recipe = load_recipe(None, str(tmp_path / "study"), [f"--eval.data_dir={eval_data}", "--eval.tasks=jcom",
                                                         "--eval.limit=1"])
    recipe.heldout.clear()
    path = Pipeline(recipe).evaluate("base", str(tiny_model_dir))
    assert json.loads(open(path, encoding="utf-8").read())["tasks"]["jcom"]["n"] == 1
    assert calls[0][1]["tasks"] == "jcom" and calls[0][1]["heldout"] == "none" and calls[0][1]["name"] == "base"
