"""Prompt construction: the exact prompt of one item of each task, rebuilt here from the raw files and the
protocol JSON by the layout the reference tools document, independently of the package's helpers."""

from __future__ import annotations

import csv
import json
import random

import pytest

from moecpt.eval import tasks as T

HEADER_KEY = "_prompt"


@pytest.fixture(scope="module")
def proto(eval_data):
    return T.load_protocol(eval_data)


def _first(task: str, eval_data, proto, limit=1, budget=None):
    return T.TASKS[task].build(eval_data, proto, limit, budget or T.Budget())


def _llm_jp_expected(proto, key: str, text: str) -> str:
    spec = proto["llm_jp_eval"]
    t = spec["tasks"][key]
    out = spec[HEADER_KEY]["header"] + "\n### 指示\n" + t["instruction"] + "\n"
    for n, shot in enumerate(t["few_shots"]):
        out += ("\n" if n else "") + "\n### 入力：\n" + shot["input"] + "\n### 回答：\n" + shot["output"]
    return out + "\n\n### 入力：\n" + text + "\n### 回答：\n"


def test_jcom_prompt(eval_data, proto):
    row = json.loads((eval_data / "jcommonsenseqa/valid-v1.1.json").open(encoding="utf-8").readline())
    text = (f"質問：{row['question']}\n選択肢：0.{row['choice0']},1.{row['choice1']},2.{row['choice2']},"
            f"3.{row['choice3']},4.{row['choice4']}")
    (item,) = _first("jcom", eval_data, proto)
    assert item.prompt == _llm_jp_expected(proto, "jcommonsenseqa", text)
    assert item.gold == str(row["label"])
    assert item.prompt.startswith("以下はタスクを説明する指示と、追加の背景情報を提供する入力の組み合わせです。")
    assert item.prompt.count("### 入力：") == 5 and item.prompt.endswith("\n### 回答：\n")


def test_jcom_fixed_shots_are_train_items_0_to_3(eval_data, proto):
    """The input layout reproduces the protocol's four shots from the JGLUE train items q_id 0-3."""
    rows = {}
    with (eval_data / "jcommonsenseqa/train-v1.1.json").open(encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["q_id"] < 4:
                rows[r["q_id"]] = r
    shots = proto["llm_jp_eval"]["tasks"]["jcommonsenseqa"]["few_shots"]
    assert [{"input": T.jcom_input(rows[i]), "output": str(rows[i]["label"])} for i in range(4)] == shots


def test_jemhopqa_prompt_and_shots_from_train_pool(eval_data, proto):
    dev = json.loads((eval_data / "jemhopqa/corpus/dev.json").read_text("utf-8"))
    (item,) = _first("jemhopqa", eval_data, proto)
    assert item.prompt == _llm_jp_expected(proto, "jemhopqa", "質問：" + dev[0]["question"])
    assert item.gold == dev[0]["answer"]
    train = {f"質問：{r['question']}": r["answer"]
             for r in json.loads((eval_data / "jemhopqa/corpus/train.json").read_text("utf-8"))}
    for shot in proto["llm_jp_eval"]["tasks"]["jemhopqa"]["few_shots"]:
        assert train[shot["input"]] == shot["output"]


def test_niilc_prompt_drops_dash_answers_and_joins(eval_data, proto):
    items = T.read_niilc(eval_data / "niilc/NIILC-ECQA2015_test.xml")
    assert len(items) == 198  # 200 questions, two answered '-'
    assert all(gold != "-" for _, _, gold in items)
    (item,) = _first("niilc", eval_data, proto)
    qid, text, gold = items[0]
    assert item.prompt == _llm_jp_expected(proto, "niilc", text) and item.gold == gold
    assert text == "質問：初めてノート型パソコンを作ったメーカーは？"
    dev = {t: g for _, t, g in T.read_niilc(eval_data / "niilc/NIILC-ECQA2015_dev.xml")}
    for shot in proto["llm_jp_eval"]["tasks"]["niilc"]["few_shots"]:
        if shot["input"] in dev:  # the pool item reproduces the shot, answers joined by ','
            assert dev[shot["input"]] == shot["output"]
    assert any(s["input"] in dev for s in proto["llm_jp_eval"]["tasks"]["niilc"]["few_shots"])


def test_jsquad_prompt_uses_context_as_given_and_first_answer(eval_data, proto):
    data = json.loads((eval_data / "jsquad/valid-v1.1.json").read_text("utf-8"))["data"]
    para = data[0]["paragraphs"][0]
    qa = para["qas"][0]
    (item,) = _first("jsquad", eval_data, proto)
    assert para["context"].startswith(data[0]["title"] + " [SEP] ")
    assert item.prompt == _llm_jp_expected(proto, "jsquad", f"文章：{para['context']}\n質問：{qa['question']}")
    assert item.gold == qa["answers"][0]["text"]


def _harness_order(n: int) -> tuple[random.Random, list[int]]:
    rnd = random.Random(42)
    order = list(range(n))
    rnd.shuffle(order)
    return rnd, order


def test_wmt20_en_ja_prompt_and_shot_sampling(eval_data, proto):
    src = (eval_data / "wmt20_vat/vat_newstest2020-enja-src.en.txt").read_text("utf-8").splitlines()
    ref = (eval_data / "wmt20_vat/vat_newstest2020-enja-ref.ja.txt").read_text("utf-8").splitlines()
    docs = [{"src": s, "ref": r} for s, r in zip(src, ref, strict=True)]
    rnd, order = _harness_order(len(docs))
    first = docs[order[0]]
    shots = [d for d in rnd.sample(docs, 5) if d != first][:4]
    expected = "\n\n".join(f"English phrase: {d['src']}\nJapanese phrase: {d['ref']}" for d in shots)
    expected += f"\n\nEnglish phrase: {first['src']}\nJapanese phrase:"
    items = _first("wmt20_en_ja", eval_data, proto, limit=3)
    assert items[0].prompt == expected and items[0].gold == first["ref"] and items[0].id == str(order[0])
    # later items continue the same Random: their shots differ from the first item's
    assert items[1].prompt.split("\n\n")[:4] != items[0].prompt.split("\n\n")[:4]


def test_wmt20_ja_en_prompt(eval_data, proto):
    src = (eval_data / "wmt20_vat/vat_newstest2020-jaen-src.ja.txt").read_text("utf-8").splitlines()
    ref = (eval_data / "wmt20_vat/vat_newstest2020-jaen-ref.en.txt").read_text("utf-8").splitlines()
    _, order = _harness_order(len(src))
    (item,) = _first("wmt20_ja_en", eval_data, proto)
    assert item.prompt.endswith(f"\n\nJapanese phrase: {src[order[0]]}\nEnglish phrase:")
    assert item.prompt.count("\nEnglish phrase: ") == 4 and item.gold == ref[order[0]]


def test_xlsum_prompt(eval_data, proto):
    docs = [json.loads(line) for line in (eval_data / "xlsum_ja/test.jsonl").open(encoding="utf-8")]
    pool = [json.loads(line) for line in (eval_data / "xlsum_ja/validation.jsonl").open(encoding="utf-8")]
    rnd, order = _harness_order(len(docs))
    doc = docs[order[0]]
    (shot,) = rnd.sample(pool, 1)
    expected = ("与えられたニュース記事を要約してください。\n\n" + f"ニュース記事:{shot['text']}\n要約:{shot['summary']}"
                + f"\n\nニュース記事:{doc['text']}\n要約:")
    (item,) = _first("xlsum", eval_data, proto)
    assert item.prompt == expected and item.gold == doc["summary"]


def test_xlsum_long_context_is_cut_at_sentence_ends(eval_data, proto):
    """With a context length, the budget is max_length - (summary length + 10), shared by the two articles
    (characters count as tokens here; tests/eval/test_xlsum_cut.py checks the real tokenizer)."""
    budget = T.Budget(count_tokens=len, max_prompt_tokens=None, max_length=800)
    (item,) = _first("xlsum", eval_data, proto, budget=budget)
    assert item.prompt.startswith("与えられたニュース記事を要約してください。\n\nニュース記事:")
    assert item.prompt.endswith("。\n要約:")  # the item's article, cut after a whole sentence
    assert item.prompt.count("ニュース記事:") == 2
    share = (800 - (len(item.gold) + 10)) // 2
    article = "ニュース記事:" + item.prompt.split("ニュース記事:")[2][: -len("。\n要約:")]
    assert len(article) <= share
    (uncut,) = _first("xlsum", eval_data, proto, budget=T.Budget(count_tokens=len, max_length=100_000))
    assert uncut == _first("xlsum", eval_data, proto)[0] and len(uncut.prompt) > 800


def test_xlsum_first_sentence_longer_than_its_share_keeps_its_head():
    budget = T.Budget(count_tokens=len, max_length=60)
    parts = [("ニュース記事:" + "あ" * 100 + "。い。\n", "要約:")]
    out = T.fit_xlsum("説明\n\n", parts, 30, budget, "\n")
    assert out == "説明\n\n" + ("ニュース記事:" + "あ" * 100)[:30] + "\n要約:"


def test_mgsm_prompt(eval_data, proto):
    with (eval_data / "mgsm/mgsm_ja.tsv").open(encoding="utf-8", newline="") as f:
        docs = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    ex = json.loads((eval_data / "mgsm/exemplars.json").read_text("utf-8"))["MGSM_EXEMPLARS"]["ja"]
    train = [ex[str(i)] for i in range(1, 9)]
    rnd, order = _harness_order(len(docs))
    question, answer = docs[order[0]]
    shots = rnd.sample(train, 4)
    expected = "\n\n".join(s["q"] + "\nステップごとの答え：" + s["a"][len("ステップごとの答え："):] for s in shots)
    expected += f"\n\n問題：{question}\nステップごとの答え："
    (item,) = _first("mgsm", eval_data, proto)
    assert all(s["q"].startswith("問題：") for s in shots)
    assert item.prompt == expected and item.gold == str(int(answer.replace(",", "")))


def test_mgsm_full_run_reads_every_row(eval_data, proto):
    items = T.TASKS["mgsm"].build(eval_data, proto, None, T.Budget())
    assert len(items) == 250 and {"2125", "114200", "276000", "5600"} <= {i.gold for i in items}
    assert all(i.gold.lstrip("-").isdigit() for i in items)


def test_mgsm_bad_answer_names_the_row(tmp_path):
    (tmp_path / "bad.tsv").write_text("問題1\t3\n問題2\t3.5\n", encoding="utf-8")
    with pytest.raises(T.UserError, match=r"bad.tsv:2: MGSM answer '3.5' is not an integer"):
        T.read_mgsm(tmp_path / "bad.tsv")


def test_niilc_answers_are_whitespace_stripped(eval_data, tmp_path):
    golds = {g for _, _, g in T.read_niilc(eval_data / "niilc/NIILC-ECQA2015_test.xml")}
    assert all(g == g.strip() and ", " not in g for g in golds)
    assert any("Digital Versatile Disc" in g for g in golds)  # written 'Digital Versatile Disc ' in the file
    (tmp_path / "q.xml").write_text("<questions><question id='q1'><text> 問い </text><answers><answer> 甲 </answer>"
                                    "<answer>乙\n</answer></answers></question></questions>", encoding="utf-8")
    assert T.read_niilc(tmp_path / "q.xml") == [("q1", "質問：問い", "甲,乙")]


def test_wmt_lines_are_rstripped(tmp_path):
    (tmp_path / "wmt20").mkdir()
    (tmp_path / "wmt20/en-ja.en").write_text("Hello. \nBye\t\n", encoding="utf-8")
    (tmp_path / "wmt20/en-ja.ja").write_text("こんにちは。\u3000\nさようなら \n", encoding="utf-8")
    assert T.read_parallel(tmp_path, "wmt20_en_ja") == [{"src": "Hello.", "ref": "こんにちは。"},
                                                        {"src": "Bye", "ref": "さようなら"}]


def test_missing_packages_are_named_before_anything_runs(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "nagisa", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "rapidfuzz", None)
    tasks = T.select_tasks("ja", None)
    assert T.missing_packages(tasks) == ["nagisa", "rapidfuzz"]
    assert T.missing_packages([T.TASKS["jcom"], T.TASKS["xlsum"], T.TASKS["mgsm"], T.TASKS["gsm8k"]]) == []
    with pytest.raises(T.UserError, match=r"nagisa \(for wmt20_en_ja\); rapidfuzz \(for jemhopqa, niilc, jsquad\)"
                                          r".*pip install 'moecpt\[eval\]'"):
        T.check_requirements(tasks)
    T.check_requirements([T.TASKS["jcom"], T.TASKS["wmt20_ja_en"]])  # sacrebleu is there: no error


def test_no_mecab_needed():
    """XL-Sum's ROUGE counts the evaluated tokenizer's pieces: no task needs MeCab (fugashi) any more."""
    assert not any({"fugashi", "unidic_lite", "MeCab"} & set(t.requires) for t in T.TASKS.values())
    assert T.TASKS["xlsum"].tokenized and T.TASKS["xlsum"].requires == ()


def test_mgsm_drops_shots_until_the_prompt_fits(eval_data, proto):
    full = _first("mgsm", eval_data, proto)[0].prompt
    budget = T.Budget(count_tokens=len, max_prompt_tokens=len(full) // 2)
    (item,) = _first("mgsm", eval_data, proto, budget=budget)
    assert len(item.prompt) <= len(full) // 2
    assert 0 <= item.prompt.count("問題：") - 1 < 4


def test_gsm8k_prompt(eval_data, proto):
    docs = [json.loads(line) for line in (eval_data / "gsm8k/test.jsonl").open(encoding="utf-8")]
    rnd, order = _harness_order(len(docs))
    doc = docs[order[0]]
    shots = [d for d in rnd.sample(docs, 9) if d != doc][:8]
    expected = "\n\n".join(f"Question: {d['question']}\nAnswer: {d['answer']}" for d in shots)
    expected += f"\n\nQuestion: {doc['question']}\nAnswer:"
    (item,) = _first("gsm8k", eval_data, proto)
    assert item.prompt == expected and item.gold == doc["answer"]


def test_limit_takes_the_first_items(eval_data, proto):
    assert [i.id for i in _first("jcom", eval_data, proto, limit=3)] == ["8939", "8940", "8941"]
    assert len(T.TASKS["jsquad"].build(eval_data, proto, None, T.Budget())) == 4442


def test_missing_file_names_the_task_and_the_file(tmp_path, eval_data):
    proto = T.load_protocol(eval_data)
    with pytest.raises(T.MissingData, match=r"task jsquad: .*jsquad/valid-v1.1.json"):
        T.TASKS["jsquad"].build(tmp_path, proto, 1, T.Budget())
    with pytest.raises(T.MissingData, match=r"task mgsm: protocol file not found: .*jp_harness_9b42d41_tasks.json"):
        T.TASKS["mgsm"].build(tmp_path, T.load_protocol(tmp_path), 1, T.Budget())


def test_select_tasks():
    assert [t.name for t in T.select_tasks("ja", None)] == list(T.JA_TASKS)
    assert [t.name for t in T.select_tasks("all", None)] == list(T.JA_TASKS) + ["gsm8k"]
    assert [t.name for t in T.select_tasks("ja", "mgsm,jcom")] == ["mgsm", "jcom"]
    with pytest.raises(T.UserError, match="unknown task"):
        T.select_tasks("ja", "jcom,nope")


def test_no_bos_in_the_2024_03_protocol():
    """The JP harness (hf-causal-experimental), lm-evaluation-harness and the pre-2024-07 transformers
    text-generation pipeline behind llm-jp-eval all tokenized prompts without special tokens."""
    assert not any(t.bos for t in T.TASKS.values())


def test_generation_settings_come_from_the_protocol(proto):
    assert T.generation(T.TASKS["jcom"], proto) == (1, ("\n",))
    assert [T.generation(T.TASKS[t], proto)[0] for t in ("jemhopqa", "niilc", "jsquad")] == [15, 180, 25]
    assert T.generation(T.TASKS["mgsm"], proto) == (256, ("\n",))  # "<eos>" is left to the tokenizer's EOS
    assert T.generation(T.TASKS["xlsum"], proto) == (256, ("\n",))
    assert T.generation(T.TASKS["gsm8k"], proto) == (256, ("Question:",))
