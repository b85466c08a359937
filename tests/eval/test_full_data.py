"""Every item of every task in the shared data goes through the runner's scoring path, so that no row of any file
can crash a full run again (MGSM's "2,125" did). The completer is canned: it answers each prompt with its gold
answer written the way a model would (MGSM with thousands separators, GSM8K after `#### `), so every score is
known: 1.0. The item counts come from the raw files, read here without moecpt."""

from __future__ import annotations

import json

import pytest

from moecpt.eval import runner
from moecpt.eval import tasks as T


def _lines(path) -> int:
    return sum(1 for line in path.read_text("utf-8").splitlines() if line.strip())


def _expected_counts(d) -> dict[str, int]:
    import xml.etree.ElementTree as ET

    niilc = [q for q in ET.parse(d / "niilc/NIILC-ECQA2015_test.xml").getroot().iter("question")
             if ",".join(a.text.strip() for a in q.iter("answer") if a.text and a.text.strip()) != "-"]
    jsquad = json.loads((d / "jsquad/valid-v1.1.json").read_text("utf-8"))["data"]
    return {
        "jcom": _lines(d / "jcommonsenseqa/valid-v1.1.json"),
        "jemhopqa": len(json.loads((d / "jemhopqa/corpus/dev.json").read_text("utf-8"))),
        "niilc": len(niilc),
        "jsquad": sum(len(p["qas"]) for a in jsquad for p in a["paragraphs"]),
        "xlsum": _lines(d / "xlsum_ja/test.jsonl"),
        "mgsm": _lines(d / "mgsm/mgsm_ja.tsv"),
        "wmt20_en_ja": _lines(d / "wmt20_vat/vat_newstest2020-enja-ref.ja.txt"),
        "wmt20_ja_en": _lines(d / "wmt20_vat/vat_newstest2020-jaen-ref.en.txt"),
        "gsm8k": _lines(d / "gsm8k/test.jsonl"),
    }


def _as_model_would_write(task: str, gold: str) -> str:
    if task == "mgsm":
        return f"よって、答えは{int(gold):,}です。"
    if task == "gsm8k":
        return f"Adding it up gives the total.\n#### {gold.split('####')[-1].strip()}"
    return gold


class Canned:
    """Answers every prompt of the suite with its gold answer; pieces are the real Mixtral tokenizer's."""

    max_length = 1_000_000  # nothing is cut: the prompts are the ones built with an unlimited budget
    batch_size = 512

    def __init__(self, answers: dict[str, list[str]], pieces):
        self.answers = answers
        self.pieces = pieces
        self.seen = 0

    def count_tokens(self, text: str) -> int:
        return len(text)

    def head(self, text: str, n: int) -> str:
        return text[:n]

    def complete(self, requests):
        self.seen += len(requests)
        # JSQuAD repeats 4 questions with different golds: identical prompts come in item order (the runner's
        # sort by length is stable), so each takes the next answer queued for it
        return [self.answers[r.prompt].pop(0) for r in requests]


def test_every_item_of_every_task_scores(eval_data, tmp_path):
    from moecpt.data.tokenizer import load_tokenizer

    proto = T.load_protocol(eval_data)
    tasks = T.select_tasks("all", None)
    answers: dict[str, list[str]] = {}
    for task in tasks:
        for item in task.build(eval_data, proto, None, T.Budget()):
            answers.setdefault(item.prompt, []).append(_as_model_would_write(task.name, item.gold))
    lm = Canned(answers, load_tokenizer(None).pieces)
    res = runner.evaluate(lm, tasks, eval_data, tmp_path, {"model": "canned"}, progress=False)

    expected = _expected_counts(eval_data)
    assert {t: r["n"] for t, r in res["tasks"].items()} == expected
    assert expected["mgsm"] == 250 and expected["niilc"] == 198 and lm.seen == sum(expected.values())
    assert res["skipped"] == {}
    for name, r in res["tasks"].items():
        assert r["score"] == pytest.approx(1.0), name
    lines = (tmp_path / "predictions/mgsm.jsonl").read_text("utf-8").splitlines()
    assert len(lines) == 250 and all(json.loads(x)["score"] == 1.0 for x in lines)
