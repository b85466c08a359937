"""The runner with a scripted completer: scoring, predictions on disk, resume after a crash, refusals."""

from __future__ import annotations

import json

import pytest

from moecpt.errors import UserError
from moecpt.eval import report, runner
from moecpt.eval import tasks as T


class Scripted:
    """Answers every prompt with `answer(prompt)`; can crash after a number of batches."""

    max_length = 100_000
    batch_size = 2

    def __init__(self, answer=lambda prompt: "0", crash_after: int | None = None):
        self.answer = answer
        self.crash_after = crash_after
        self.prompts: list[str] = []
        self.batches = 0

    def count_tokens(self, text: str) -> int:
        return len(text)

    def head(self, text: str, n: int) -> str:
        return text[:n]

    def pieces(self, text: str) -> list[str]:
        return list(text)

    def complete(self, requests):
        if self.crash_after is not None and self.batches >= self.crash_after:
            raise KeyboardInterrupt("simulated crash")
        self.batches += 1
        self.prompts += [r.prompt for r in requests]
        return [self.answer(r.prompt) for r in requests]


IDENTITY = {"model": {"path": "/models/a"}, "tokenizer": "abc"}


def _gold_answers(eval_data):
    """A completer that answers JCom with the gold label (from the prompt's own choice list)."""
    proto = T.load_protocol(eval_data)
    items = T.TASKS["jcom"].build(eval_data, proto, 10, T.Budget())
    gold = {i.prompt: i.gold for i in items}
    return lambda prompt: gold.get(prompt, "9")


def test_scores_and_predictions_file(tmp_path, eval_data):
    lm = Scripted(_gold_answers(eval_data))
    res = runner.evaluate(lm, [T.TASKS["jcom"]], eval_data, tmp_path, IDENTITY, limit=10, progress=False)
    assert res["tasks"]["jcom"] == {"score": 1.0, "n": 10, "metric": "exact_match", "source": "llm-jp-eval v1.0"}
    assert res["average"] == 1.0
    lines = [json.loads(x) for x in (tmp_path / "predictions/jcom.jsonl").read_text("utf-8").splitlines()]
    assert len(lines) == 10 and {rec["score"] for rec in lines} == {1.0}
    assert {"id", "prompt_sha1", "output", "prediction", "gold"} <= set(lines[0])


def test_llm_jp_prediction_is_nfkc_and_cut_at_newline(tmp_path, eval_data):
    lm = Scripted(lambda prompt: "２\n3")  # full-width digit, then a second line
    res = runner.evaluate(lm, [T.TASKS["jcom"]], eval_data, tmp_path, IDENTITY, limit=4, progress=False)
    rec = json.loads((tmp_path / "predictions/jcom.jsonl").read_text("utf-8").splitlines()[0])
    assert rec["output"] == "２\n3" and rec["prediction"] == "2"
    assert res["tasks"]["jcom"]["score"] == pytest.approx(
        sum(i.gold == "2" for i in T.TASKS["jcom"].build(eval_data, T.load_protocol(eval_data), 4, T.Budget())) / 4)


def test_resume_after_crash_completes_only_the_rest(tmp_path, eval_data):
    tasks = [T.TASKS["jcom"], T.TASKS["mgsm"]]
    first = Scripted(crash_after=2)
    with pytest.raises(KeyboardInterrupt):
        runner.evaluate(first, tasks, eval_data, tmp_path, IDENTITY, limit=5, progress=False)
    assert len((tmp_path / "predictions/jcom.jsonl").read_text("utf-8").splitlines()) == 4
    # a torn last line, as a kill during a write leaves it
    with (tmp_path / "predictions/jcom.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"id": "89')

    second = Scripted()
    res = runner.evaluate(second, tasks, eval_data, tmp_path, IDENTITY, limit=5, progress=False)
    assert len(second.prompts) == 1 + 5  # the fifth JCom item, then all of MGSM
    assert set(second.prompts).isdisjoint(first.prompts)
    ids = [json.loads(x)["id"] for x in (tmp_path / "predictions/jcom.jsonl").read_text("utf-8").splitlines()]
    assert sorted(ids) == sorted({"8939", "8940", "8941", "8942", "8943"})
    assert res["tasks"]["jcom"]["n"] == 5 and res["tasks"]["mgsm"]["n"] == 5

    third = Scripted()
    again = runner.evaluate(third, tasks, eval_data, tmp_path, IDENTITY, limit=5, progress=False)
    assert third.prompts == [] and again["tasks"] == res["tasks"]


def test_rerun_with_another_model_is_refused(tmp_path, eval_data):
    runner.evaluate(Scripted(), [T.TASKS["jcom"]], eval_data, tmp_path, IDENTITY, limit=1, progress=False)
    other = {**IDENTITY, "model": {"path": "/models/b"}}
    with pytest.raises(UserError, match="different run .*model"):
        runner.evaluate(Scripted(), [T.TASKS["jcom"]], eval_data, tmp_path, other, limit=1, progress=False)


def test_changed_prompt_is_refused(tmp_path, eval_data):
    runner.evaluate(Scripted(), [T.TASKS["jcom"]], eval_data, tmp_path, IDENTITY, limit=1, progress=False)
    path = tmp_path / "predictions/jcom.jsonl"
    rec = json.loads(path.read_text("utf-8"))
    rec["prompt_sha1"] = "0" * 16
    path.write_text(json.dumps(rec) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="different prompt"):
        runner.evaluate(Scripted(), [T.TASKS["jcom"]], eval_data, tmp_path, IDENTITY, limit=1, progress=False)


def test_missing_task_data_is_reported_and_others_run(tmp_path, eval_data):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("llm_jp_eval_v1_tasks.json", "jp_harness_9b42d41_tasks.json", "jcommonsenseqa"):
        (data / name).symlink_to(eval_data / name)
    messages = []
    res = runner.evaluate(Scripted(), [T.TASKS["jsquad"], T.TASKS["jcom"]], data, tmp_path / "out", IDENTITY,
                          limit=2, progress=False, log=messages.append)
    assert list(res["tasks"]) == ["jcom"]
    assert "jsquad/valid-v1.1.json" in res["skipped"]["jsquad"]
    assert any("task jsquad" in m and "valid-v1.1.json" in m for m in messages)
    md = report.markdown(res)
    assert "## Not run" in md and "jsquad" in md


def test_averages_separate_languages():
    res = {"jcom": {"score": 0.5}, "mgsm": {"score": 0.25}, "gsm8k": {"score": 0.1}}
    assert runner.averages(res) == {"average": 0.375, "average_en": 0.1}
    assert runner.averages({"gsm8k": {"score": 0.1}}) == {"average": 0.1, "average_en": 0.1}


def test_markdown_layout_and_comparison(tmp_path):
    base = {"name": "Mixtral-8x7B", "protocol": "swallow-2024-03", "tasks": {"jcom": {"score": 0.8, "n": 1},
            "mgsm": {"score": 0.4, "n": 1}}, "average": 0.6,
            "heldout": {"ja_wikipedia_dev": {"bits_per_byte": 1.0, "docs": 1, "tokens": 2, "bytes": 3}}}
    cpt = {"name": "Swallow-MX", "protocol": "swallow-2024-03", "tasks": {"jcom": {"score": 0.9, "n": 1},
           "mgsm": {"score": 0.45, "n": 1}}, "average": 0.675,
           "heldout": {"ja_wikipedia_dev": {"bits_per_byte": 0.75, "docs": 1, "tokens": 2, "bytes": 3}}}
    md = report.markdown(cpt, base)
    assert "| Model | JCom. | MGSM | Ja avg |" in md
    rows = md.splitlines()
    assert rows.index("| Mixtral-8x7B | 0.8000 | 0.4000 | 0.6000 |") < rows.index(
        "| Swallow-MX | 0.9000 | 0.4500 | 0.6750 |")
    assert "| JCom. | 0.9000 | 0.8000 | +0.1000 |" in md
    assert "| Ja avg | 0.6750 | 0.6000 | +0.0750 |" in md
    assert "| ja_wikipedia_dev | 0.7500 | 1.0000 | -0.2500 |" in md
    report.write(tmp_path, cpt, base)
    assert json.loads((tmp_path / "results.json").read_text("utf-8"))["average"] == 0.675
    assert (tmp_path / "results.md").read_text("utf-8") == md
    assert report.read_results(tmp_path)["name"] == "Swallow-MX"
    with pytest.raises(UserError, match="no such results file"):
        report.read_results(tmp_path / "nope.json")
