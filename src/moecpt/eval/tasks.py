"""The benchmark tasks: dataset readers and prompt construction, following the reference tools exactly.

The strings of the protocol (instructions, fixed few-shot examples, templates, separators, stop strings) are
data: they are read from two JSON files in the evaluation data directory, named by the protocol preset. The
code here only lays them out the way each reference tool does.

- llm-jp-eval v1.0 tasks (jcom, jemhopqa, niilc, jsquad): a fixed header and instruction, four fixed shots,
  the item; prediction = NFKC(generated text) cut at the first newline.
- JP LM Evaluation Harness tasks (xlsum, mgsm, wmt20_en_ja, wmt20_ja_en): description + shots joined by the
  few-shot separator + the item; shots drawn with one `random.Random(42)` that also shuffled the scored docs.
- GSM8K (English, lm-evaluation-harness layout): `Question: ...\\nAnswer: ...` shots, strict `#### N` match.
"""

from __future__ import annotations

import csv
import json
import random
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moecpt.errors import UserError
from moecpt.eval import metrics

# A protocol preset names the files that hold its strings. A later protocol adds an entry here.
PROTOCOLS: dict[str, dict[str, str]] = {
    "swallow-2024-03": {
        "llm_jp_eval": "llm_jp_eval_v1_tasks.json",
        "jp_harness": "jp_harness_9b42d41_tasks.json",
    },
}
DEFAULT_PROTOCOL = "swallow-2024-03"

JA_TASKS = ("jcom", "jemhopqa", "niilc", "jsquad", "xlsum", "mgsm", "wmt20_en_ja", "wmt20_ja_en")
EN_TASKS = ("gsm8k",)
ALL_TASKS = JA_TASKS + EN_TASKS


class MissingData(UserError):
    """A file a task needs is absent; the runner reports it and goes on with the other tasks."""


@dataclass(frozen=True)
class Item:
    """One scored example: its id, the full prompt and the reference the prediction is scored against."""

    id: str
    prompt: str
    gold: str


@dataclass(frozen=True)
class Budget:
    """How prompts are measured: a token counter (no BOS), the longest prompt allowed for a task, the context
    length (prompt + generation; XL-Sum sets its own budget from it) and `head(text, n)`, the text of the first
    n tokens of `text` (by default its first n characters, to go with the default counter `len`)."""

    count_tokens: Callable[[str], int] = len
    max_prompt_tokens: int | None = None
    max_length: int | None = None
    head: Callable[[str, int], str] = field(default=lambda text, n: text[:max(n, 0)], repr=False)

    def fits(self, text: str) -> bool:
        return self.max_prompt_tokens is None or self.count_tokens(text) <= self.max_prompt_tokens


@dataclass(frozen=True)
class Task:
    """A benchmark task: how to read it, prompt it, generate for it and score it."""

    name: str
    title: str  # column header of the Swallow-MX table
    lang: str  # "ja" or "en"
    source: str  # the reference tool whose protocol it follows
    metric: str
    protocol_key: str | None  # the task's key in the protocol file
    max_new_tokens: int  # defaults; `generation()` reads the protocol's values
    stop: tuple[str, ...]
    # "after_prompt": the generated text is decode(prompt + new)[len(decode(prompt)):] (Hugging Face pipeline,
    # llm-jp-eval); "new_tokens": decode(new tokens) (JP harness, lm-evaluation-harness).
    decode: str
    # Prompt starts with BOS? Not in the 2024-03 protocol: both harnesses encode with add_special_tokens=False
    # and so did the transformers text-generation pipeline behind llm-jp-eval until transformers PR #31747.
    bos: bool
    build: Callable[[Path, dict[str, Any], int | None, Budget], list[Item]] = field(repr=False)
    clean: Callable[[str], str] = field(repr=False)
    item_score: Callable[[str, str], float] | None = field(repr=False)
    corpus_score: Callable[..., float] | None = field(default=None, repr=False)
    # corpus_score takes a third argument, the evaluated tokenizer's pieces (text -> list of token strings)
    tokenized: bool = False
    requires: tuple[str, ...] = ()  # Python modules its scoring imports (see `missing_packages`)

    def score(self, preds: list[str], golds: list[str],
              tokenize: Callable[[str], list[str]] | None = None) -> float:
        """The task score over these items, 0-1. `tokenize`: the evaluated tokenizer's pieces, which a
        `tokenized` task (XL-Sum) scores over."""
        if self.tokenized:
            if tokenize is None:
                raise ValueError(f"task {self.name} is scored over the evaluated tokenizer's pieces: pass tokenize")
            return self.corpus_score(preds, golds, tokenize)
        if self.corpus_score is not None:
            return self.corpus_score(preds, golds)
        return metrics.mean([self.item_score(p, g) for p, g in zip(preds, golds, strict=True)])


# ---------------------------------------------------------------------------------------------------------------
# file helpers


def _need(data_dir: Path, task: str, *candidates: str) -> Path:
    """The first of `candidates` (paths relative to the data directory) that exists, else MissingData."""
    for rel in candidates:
        if (data_dir / rel).is_file():
            return data_dir / rel
    expected = " or ".join(str(data_dir / c) for c in candidates)
    raise MissingData(f"task {task}: data file not found: expected {expected}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{n}: invalid JSON Lines record ({e.msg})") from e
    return rows


def _field(row: dict, key: str, path: Path) -> Any:
    if key not in row:
        raise UserError(f"{path}: record without the field {key!r} (have: {', '.join(row)}); is this the "
                        f"official format of the dataset?")
    return row[key]


def load_protocol(data_dir: Path, name: str = DEFAULT_PROTOCOL) -> dict[str, Any]:
    """The protocol's string files, read from the data directory: {"llm_jp_eval": {...}, "jp_harness": {...}}.

    A missing file is not an error here: the tasks that need it report it when they are built.
    """
    if name not in PROTOCOLS:
        raise UserError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    out: dict[str, Any] = {"name": name}
    for key, filename in PROTOCOLS[name].items():
        path = data_dir / filename
        out[key] = _read_json(path) if path.is_file() else None
        out[key + "_file"] = path
    return out


def _protocol_part(protocol: dict[str, Any], key: str, task: str) -> dict[str, Any]:
    part = protocol.get(key)
    if part is None:
        raise MissingData(f"task {task}: protocol file not found: expected {protocol[key + '_file']}")
    return part


# ---------------------------------------------------------------------------------------------------------------
# llm-jp-eval v1.0


def jcom_input(row: dict) -> str:
    """llm-jp-eval's JCommonsenseQA input: the question, then the five numbered choices."""
    choices = ",".join(f"{i}.{row[f'choice{i}']}" for i in range(5))
    return f"質問：{row['question']}\n選択肢：{choices}"


def niilc_answer(answers: list[str]) -> str:
    """NIILC's reference: the non-empty answers joined by ','."""
    return ",".join(a for a in answers if a)


def llm_jp_prompt(header: str, instruction: str, shots: list[dict], text: str) -> str:
    """llm-jp-eval's prompt: header, `### 指示`, the shots (blank line between), then the item."""
    shot_text = "\n".join(f"\n### 入力：\n{s['input']}\n### 回答：\n{s['output']}" for s in shots)
    return f"{header}\n### 指示\n{instruction}\n{shot_text}\n\n### 入力：\n{text}\n### 回答：\n"


def read_jcom(path: Path) -> list[tuple[str, str, str]]:
    """(id, input, gold) of JGLUE JCommonsenseQA (JSON Lines)."""
    return [(str(r["q_id"]), jcom_input(r), str(r["label"])) for r in _read_jsonl(path)]


def read_jemhopqa(path: Path) -> list[tuple[str, str, str]]:
    rows = _read_json(path)
    return [(str(_field(r, "qid", path)), f"質問：{r['question']}", str(r["answer"])) for r in rows]


def read_niilc(path: Path) -> list[tuple[str, str, str]]:
    """NIILC questions with their joined answers (each stripped of surrounding whitespace); items whose answer
    is '-' are dropped, as llm-jp-eval does."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise UserError(f"{path}: not valid XML ({e})") from e
    out = []
    for q in root.iter("question"):  # text nodes whitespace-stripped, as xmltodict (llm-jp-eval's reader) does
        answer = niilc_answer([(a.text or "").strip() for a in q.iter("answer")])
        if answer == "-":
            continue
        out.append((q.get("id", ""), f"質問：{q.findtext('text', '').strip()}", answer))
    return out


def read_jsquad(path: Path) -> list[tuple[str, str, str]]:
    """JSQuAD questions: context as JGLUE gives it (`{title} [SEP] {text}`), reference = first gold answer."""
    out = []
    for article in _field(_read_json(path), "data", path):
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                text = f"文章：{para['context']}\n質問：{qa['question']}"
                out.append((str(qa["id"]), text, qa["answers"][0]["text"]))
    return out


def _llm_jp_builder(task: str, key: str, files: tuple[str, ...], reader: Callable[[Path], list]):
    def build(data_dir: Path, protocol: dict, limit: int | None, budget: Budget) -> list[Item]:
        spec = _protocol_part(protocol, "llm_jp_eval", task)
        header = spec["_prompt"]["header"]
        t = spec["tasks"][key]
        rows = reader(_need(data_dir, task, *files))
        if limit is not None:
            rows = rows[:limit]
        shots = t["few_shots"][:4]
        return [Item(i, llm_jp_prompt(header, t["instruction"], shots, text), gold) for i, text, gold in rows]

    return build


def llm_jp_clean(text: str) -> str:
    """llm-jp-eval's prediction: NFKC-normalised, cut at the first newline."""
    return metrics.nfkc(text).split("\n")[0]


def _nfkc_gold(score: Callable[[str, str], float]) -> Callable[[str, str], float]:
    return lambda pred, gold: score(pred, metrics.nfkc(gold))


# ---------------------------------------------------------------------------------------------------------------
# JP LM Evaluation Harness @9b42d41


def harness_context(description: str, shots: list[str], text: str, fewshot_sep: str) -> str:
    """The harness's context: description, the shots (each text + target) joined and followed by the
    few-shot separator, then the item's text. With no shots: description + item."""
    if not shots:
        return description + text
    return description + fewshot_sep.join(shots) + fewshot_sep + text


def draw_shots(rnd: random.Random, doc: Any, k: int, train: list | None, pool: list) -> list:
    """One item's shots as the harness draws them: k from the training docs, or k+1 from the test docs with
    the item itself removed (by equality), keeping k."""
    if k == 0:
        return []
    if train is not None:
        return rnd.sample(train, k)
    return [x for x in rnd.sample(pool, k + 1) if x != doc][:k]


def _shuffled(docs: list) -> tuple[random.Random, list]:
    rnd = random.Random(42)
    order = list(docs)
    rnd.shuffle(order)
    return rnd, order


def _fewshot_sep(spec: dict) -> str:
    return spec["SEP"] * 2 if "SEP" in spec else "\n\n"


XLSUM_SUMMARY_PROMPT = "要約:"  # where each article ends in the harness's XL-Sum context
XLSUM_SUMMARY_ALLOWANCE = 10  # the harness budgets the gold summary's tokens + 10 for the answer


def cut_article(text: str, share: int, budget: Budget, sep: str) -> str:
    """One article as the harness cuts it to `share` tokens: the sentences (split at '。') whose join still fits,
    the last kept one closed with '。' + `sep`; when even the first does not fit, the text of its first `share`
    tokens + `sep`. A text that fits comes back unchanged."""
    kept: list[str] = []
    for sentence in text.split("。"):
        if budget.count_tokens("。".join([*kept, sentence])) > share:
            if kept:
                kept[-1] += "。" + sep
            else:
                kept.append(budget.head(sentence, share) + sep)
            break
        kept.append(sentence)
    return "。".join(kept)


def fit_xlsum(description: str, parts: list[tuple[str, str]], max_tokens: int, budget: Budget, sep: str) -> str:
    """The harness's XL-Sum context fitting (`preprocess_ctx`). `parts` are the (article, rest) pairs of the
    shots and the item in order: the article is `ニュース記事:{text}\n`, the rest `要約:{summary}` + few-shot
    separator (just `要約:` for the item). A context of at most `max_tokens` tokens is kept whole; a longer one
    has each article cut to `max_tokens // len(parts)` tokens (the description is not counted)."""
    ctx = description + "".join(article + rest for article, rest in parts)
    if budget.count_tokens(ctx) <= max_tokens:
        return ctx
    share = max_tokens // len(parts)
    return description + "".join(cut_article(article, share, budget, sep) + rest for article, rest in parts)


def xlsum_max_tokens(summary: str, budget: Budget) -> int | None:
    """The harness's XL-Sum context budget: the context length less the gold summary's tokens and 10 (its
    DYNAMIC_MAX_LENGTH, on by default); None when the budget has no context length (nothing is cut)."""
    if budget.max_length is None:
        return None
    return budget.max_length - (budget.count_tokens(summary) + XLSUM_SUMMARY_ALLOWANCE)


def _xlsum_parts(spec: dict, shots: list[dict], doc: dict, sep: str) -> list[tuple[str, str]]:
    template = spec["doc_to_text"]
    if not template.endswith(XLSUM_SUMMARY_PROMPT):
        raise UserError(f"xlsum: the protocol's doc_to_text {template!r} must end with {XLSUM_SUMMARY_PROMPT!r}")
    cut = len(XLSUM_SUMMARY_PROMPT)
    parts = [(template.format(text=s["text"])[:-cut],
              XLSUM_SUMMARY_PROMPT + spec["doc_to_target"].format(summary=s["summary"]) + sep) for s in shots]
    return [*parts, (template.format(text=doc["text"])[:-cut], XLSUM_SUMMARY_PROMPT)]


def _build_xlsum(data_dir: Path, protocol: dict, limit: int | None, budget: Budget) -> list[Item]:
    spec = _protocol_part(protocol, "jp_harness", "xlsum")["tasks"]["xlsum_ja"]
    test_path = _need(data_dir, "xlsum", "xlsum_ja/test.jsonl")
    pool_path = _need(data_dir, "xlsum", "xlsum_ja/train.jsonl", "xlsum_ja/validation.jsonl")
    docs = _read_jsonl(test_path)
    for r in docs:
        _field(r, "text", test_path), _field(r, "summary", test_path)
    train = _read_jsonl(pool_path)
    index = {id(d): i for i, d in enumerate(docs)}
    rnd, order = _shuffled(docs)
    order = order[:limit] if limit is not None else order
    sep = _fewshot_sep(spec)
    items = []
    for doc in order:
        parts = _xlsum_parts(spec, draw_shots(rnd, doc, spec["shots"], train, docs), doc, sep)
        max_tokens = xlsum_max_tokens(doc["summary"], budget)
        if max_tokens is None:
            ctx = spec["description"] + "".join(a + b for a, b in parts)
        else:
            ctx = fit_xlsum(spec["description"], parts, max_tokens, budget, spec["SEP"])
        items.append(Item(str(doc.get("id", index[id(doc)])), ctx, doc["summary"]))
    return items


def mgsm_text(question: str) -> str:
    return f"問題：{question.replace('問題：', '')}\nステップごとの答え："


def mgsm_target(answer: str) -> str:
    return answer.replace("ステップごとの答え：", "")


def _build_mgsm(data_dir: Path, protocol: dict, limit: int | None, budget: Budget) -> list[Item]:
    spec = _protocol_part(protocol, "jp_harness", "mgsm")["tasks"]["mgsm_ja"]
    tsv = _need(data_dir, "mgsm", "mgsm/mgsm_ja.tsv")
    exemplar_file = _need(data_dir, "mgsm", "mgsm/exemplars.json")
    docs = read_mgsm(tsv)
    exemplars = _read_json(exemplar_file)["MGSM_EXEMPLARS"]["ja"]
    train = [{"question": e["q"], "answer": e["a"]} for _, e in sorted(exemplars.items(), key=lambda kv: int(kv[0]))]
    index = {id(d): i for i, d in enumerate(docs)}
    rnd, order = _shuffled(docs)
    order = order[:limit] if limit is not None else order
    sep = _fewshot_sep(spec)
    items = []
    for doc in order:
        # too long with k shots: draw again with k-1 (each attempt draws from the shared Random, as upstream)
        for k in range(spec["shots"], -1, -1):
            shots = [mgsm_text(s["question"]) + mgsm_target(s["answer"])
                     for s in draw_shots(rnd, doc, k, train, docs)]
            ctx = harness_context(spec["description"], shots, mgsm_text(doc["question"]), sep)
            if budget.fits(ctx):
                break
        items.append(Item(str(index[id(doc)]), ctx, doc["answer"]))
    return items


def read_mgsm(path: Path) -> list[dict]:
    """MGSM's TSV (question TAB answer): the answer as the integer answer_number, as a string ("2,125" ->
    "2125"); a row without two fields or with a non-integer answer is a UserError naming the row."""
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    docs = []
    for n, row in enumerate(rows, 1):
        if len(row) != 2:
            raise UserError(f"{path}:{n}: expected question TAB answer, found {len(row)} fields")
        try:
            docs.append({"question": row[0], "answer": str(metrics.mgsm_gold(row[1]))})
        except ValueError as e:
            raise UserError(f"{path}:{n}: {e}") from e
    return docs


_WMT_FILES = {
    # (source, reference) candidates: the VAT subset shipped offline, or `sacrebleu -t wmt20 -l en-ja --echo src`
    # / `--echo ref` saved under wmt20/.
    "wmt20_en_ja": [("wmt20_vat/vat_newstest2020-enja-src.en.txt", "wmt20_vat/vat_newstest2020-enja-ref.ja.txt"),
                    ("wmt20/en-ja.en", "wmt20/en-ja.ja")],
    "wmt20_ja_en": [("wmt20_vat/vat_newstest2020-jaen-src.ja.txt", "wmt20_vat/vat_newstest2020-jaen-ref.en.txt"),
                    ("wmt20/ja-en.ja", "wmt20/ja-en.en")],
}


def read_lines(path: Path) -> list[str]:
    """The lines of a text file, each `rstrip()`ed, as the harness reads sacrebleu's files."""
    with path.open(encoding="utf-8") as f:
        return [line.rstrip() for line in f]


def read_parallel(data_dir: Path, task: str) -> list[dict]:
    """Source/reference segments of a WMT20 direction, one segment a line."""
    for src_rel, ref_rel in _WMT_FILES[task]:
        src, ref = data_dir / src_rel, data_dir / ref_rel
        if src.is_file() and ref.is_file():
            s, r = read_lines(src), read_lines(ref)
            if len(s) != len(r):
                raise UserError(f"{src} has {len(s)} lines but {ref} has {len(r)}; they must align line by line")
            return [{"src": a, "ref": b} for a, b in zip(s, r, strict=True)]
    expected = " or ".join(f"{data_dir / a} + {data_dir / b}" for a, b in _WMT_FILES[task])
    raise MissingData(f"task {task}: data files not found: expected {expected}")


def _wmt_builder(task: str):
    def build(data_dir: Path, protocol: dict, limit: int | None, budget: Budget) -> list[Item]:
        spec = _protocol_part(protocol, "jp_harness", task)["tasks"][task]
        docs = read_parallel(data_dir, task)
        index = {id(d): i for i, d in enumerate(docs)}
        rnd, order = _shuffled(docs)
        order = order[:limit] if limit is not None else order
        sep = _fewshot_sep(spec)
        items = []
        for doc in order:
            shots = [spec["doc_to_text"].format(src=s["src"]) + spec["doc_to_target"].format(ref=s["ref"])
                     for s in draw_shots(rnd, doc, spec["shots"], None, docs)]
            ctx = harness_context(spec["description"], shots, spec["doc_to_text"].format(src=doc["src"]), sep)
            items.append(Item(str(index[id(doc)]), ctx, doc["ref"]))
        return items

    return build


# ---------------------------------------------------------------------------------------------------------------
# GSM8K (English)

GSM8K_SHOTS = 8


def gsm8k_text(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def _build_gsm8k(data_dir: Path, protocol: dict, limit: int | None, budget: Budget) -> list[Item]:
    test_path = _need(data_dir, "gsm8k", "gsm8k/test.jsonl")
    docs = _read_jsonl(test_path)
    for r in docs:
        _field(r, "question", test_path), _field(r, "answer", test_path)
    train_path = data_dir / "gsm8k" / "train.jsonl"
    train = _read_jsonl(train_path) if train_path.is_file() else None
    index = {id(d): i for i, d in enumerate(docs)}
    rnd, order = _shuffled(docs)
    order = order[:limit] if limit is not None else order
    items = []
    for doc in order:
        shots = [gsm8k_text(s["question"]) + " " + s["answer"] for s in draw_shots(rnd, doc, GSM8K_SHOTS, train, docs)]
        ctx = harness_context("", shots, gsm8k_text(doc["question"]), "\n\n")
        items.append(Item(str(index[id(doc)]), ctx, doc["answer"]))
    return items


# ---------------------------------------------------------------------------------------------------------------
# the registry

HARNESS = "JP LM Evaluation Harness 9b42d41"
LLM_JP = "llm-jp-eval v1.0"
HARNESS_MAX_NEW_TOKENS = 256  # the harness's max_gen_toks


def _identity(text: str) -> str:
    return text


def _llm_jp_task(name: str, title: str, key: str, metric: str, data: str, reader) -> Task:
    score = metrics.exact_match if metric == "exact_match" else metrics.char_f1
    return Task(name=name, title=title, lang="ja", source=LLM_JP, metric=metric, protocol_key=key,
                max_new_tokens=0,  # from the protocol file: output_length
                stop=("\n",),  # the prediction ends at the first newline: no need to generate past it
                decode="after_prompt", bos=False, build=_llm_jp_builder(name, key, (data,), reader),
                clean=llm_jp_clean, item_score=_nfkc_gold(score),
                requires=() if metric == "exact_match" else ("rapidfuzz",))


def _harness_task(name: str, title: str, key: str, metric: str, build, **scoring) -> Task:
    return Task(name=name, title=title, lang="ja", source=HARNESS, metric=metric, protocol_key=key,
                max_new_tokens=HARNESS_MAX_NEW_TOKENS, stop=(), decode="new_tokens", bos=False, build=build,
                clean=_identity, **{"item_score": None, **scoring})


def _mgsm_score(pred: str, gold: str) -> float:
    return metrics.mgsm_correct(pred, int(gold))


TASKS: dict[str, Task] = {t.name: t for t in (
    _llm_jp_task("jcom", "JCom.", "jcommonsenseqa", "exact_match", "jcommonsenseqa/valid-v1.1.json", read_jcom),
    _llm_jp_task("jemhopqa", "JEMHopQA", "jemhopqa", "char_f1", "jemhopqa/corpus/dev.json", read_jemhopqa),
    _llm_jp_task("niilc", "NIILC", "niilc", "char_f1", "niilc/NIILC-ECQA2015_test.xml", read_niilc),
    _llm_jp_task("jsquad", "JSQuAD", "jsquad", "char_f1", "jsquad/valid-v1.1.json", read_jsquad),
    _harness_task("xlsum", "XL-Sum", "xlsum_ja", "rouge2", _build_xlsum, corpus_score=metrics.rouge2_harness,
                  tokenized=True),
    _harness_task("mgsm", "MGSM", "mgsm_ja", "accuracy", _build_mgsm, item_score=_mgsm_score),
    _harness_task("wmt20_en_ja", "WMT20 (en-ja)", "wmt20_en_ja", "bleu", _wmt_builder("wmt20_en_ja"),
                  corpus_score=metrics.bleu_ja, requires=("sacrebleu", "nagisa")),
    _harness_task("wmt20_ja_en", "WMT20 (ja-en)", "wmt20_ja_en", "bleu", _wmt_builder("wmt20_ja_en"),
                  corpus_score=metrics.bleu_en, requires=("sacrebleu",)),
    Task(name="gsm8k", title="GSM8K", lang="en", source="lm-evaluation-harness (8-shot)", metric="strict_match",
         protocol_key=None, max_new_tokens=256, stop=("Question:",), decode="new_tokens", bos=False,
         build=_build_gsm8k, clean=_identity, item_score=metrics.gsm8k_strict_match),
)}


def missing_packages(tasks: list[Task]) -> list[str]:
    """The pip packages that `tasks` need for scoring and that are not installed (all in the `eval` extra)."""
    modules = sorted({m for t in tasks for m in t.requires})
    return [metrics.PIP_PACKAGES.get(m, m) for m in metrics.missing_modules(modules)]


def check_requirements(tasks: list[Task]) -> None:
    """Raise a UserError naming what to install when a package that `tasks` need is missing; call it before
    any model loading or training, so that a run does not fail at its end."""
    missing = missing_packages(tasks)
    if missing:
        need = {p: [t.name for t in tasks if any(metrics.PIP_PACKAGES.get(m, m) == p for m in t.requires)]
                for p in missing}
        detail = "; ".join(f"{p} (for {', '.join(names)})" for p, names in need.items())
        raise UserError(f"the selected evaluation tasks need Python packages that are not installed: {detail}. "
                        f"Install them with pip install 'moecpt[{metrics.EVAL_EXTRA}]' (from a checkout: "
                        f"pip install -e '.[{metrics.EVAL_EXTRA}]'), or choose other tasks")


def generation(task: Task, protocol: dict) -> tuple[int, tuple[str, ...]]:
    """(max_new_tokens, stop strings) of a task under a protocol: llm-jp-eval tasks take output_length from
    the protocol file, harness tasks their stop strings; a task whose protocol file is absent keeps its own
    (it is reported as missing when it is built)."""
    if task.source == LLM_JP and protocol.get("llm_jp_eval") is not None:
        return int(protocol["llm_jp_eval"]["tasks"][task.protocol_key]["output_length"]), task.stop
    if task.source == HARNESS and protocol.get("jp_harness") is not None:
        stop = protocol["jp_harness"]["tasks"][task.protocol_key]["stop"]
        # "<eos>" is the tokenizer's EOS, where generation stops anyway
        return task.max_new_tokens, tuple(s for s in stop if s != "<eos>")
    return task.max_new_tokens, task.stop


def select_tasks(suite: str, names: str | None) -> list[Task]:
    """The tasks of a suite (`ja`, `en`, `all`), or of an explicit comma-separated list."""
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in TASKS]
        if unknown:
            raise UserError(f"unknown task(s) {', '.join(unknown)} in --tasks; choose from {', '.join(ALL_TASKS)}")
        return [TASKS[n] for n in wanted]
    suites = {"ja": JA_TASKS, "en": EN_TASKS, "all": ALL_TASKS}
    if suite not in suites:
        raise UserError(f"unknown suite {suite!r}; choose ja, en or all")
    return [TASKS[n] for n in suites[suite]]
