"""XL-Sum's model inputs against the JP LM Evaluation Harness rule, rebuilt here independently of moecpt.

The rule (xlsum_ja.py `construct_requests` + `preprocess_ctx`, huggingface.py `_model_generate` at 9b42d41):
the context budget is `max_length - (tokens of the gold summary + 10)`; a context over it is split at
"ニュース記事:" into its articles (the description before them is kept and not counted), each article cut to
`budget // articles` tokens at sentence ends ("。"), the last kept sentence closed with "。" + SEP; a first
sentence longer than the share keeps the decoded text of its first share tokens + SEP. The model then sees the
last `max_length - 256` tokens of the encoded context (no BOS) and generates up to 256 tokens.

The expected inputs are computed with SentencePiece directly (the Mixtral tokenizer the harness loaded), the
actual ones are what moecpt's runner hands to `ModelLM.encode_prompt`.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from types import SimpleNamespace

import pytest

from moecpt.eval import runner
from moecpt.eval import tasks as T

spm = pytest.importorskip("sentencepiece")
pytest.importorskip("torch")

from moecpt.data.tokenizer import default_tokenizer_path, load_tokenizer  # noqa: E402
from moecpt.eval.lm import ModelLM  # noqa: E402

GEN = 256  # the harness's max_gen_toks
DESCRIPTION = "与えられたニュース記事を要約してください。\n\n"


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(default_tokenizer_path()))


def harness_cut(ctx: str, max_len: int, sp, sep: str = "\n") -> str:
    """preprocess_ctx of the harness, written out plainly on the context string."""
    if len(sp.encode(ctx)) <= max_len:
        return ctx
    chunks = ["ニュース記事:" + c for c in ctx.split("ニュース記事:")]
    out = ""
    if "要約:" not in chunks[0]:
        out = chunks[0].replace("ニュース記事:", "")
        chunks = chunks[1:]
    share = max_len // len(chunks)
    for chunk in chunks:
        text, summary = chunk.split("要約:")
        kept: list[str] = []
        for sentence in text.split("。"):
            if len(sp.encode("。".join(kept + [sentence]))) > share:
                if kept:
                    kept[-1] = kept[-1] + "。" + sep
                else:
                    kept.append(sp.decode(sp.encode(sentence)[:share]) + sep)
                break
            kept.append(sentence)
        out += "。".join(kept) + "要約:" + summary
    return out


def harness_inputs(data_dir, max_length: int, sp) -> list[tuple[int, ...]]:
    """The token ids the harness's model receives for every XL-Sum item, in its (shuffled) order."""
    docs = [json.loads(x) for x in (data_dir / "xlsum_ja/test.jsonl").read_text("utf-8").splitlines() if x]
    pool = [json.loads(x) for x in (data_dir / "xlsum_ja/validation.jsonl").read_text("utf-8").splitlines() if x]
    rnd = random.Random(42)
    order = list(docs)
    rnd.shuffle(order)
    out = []
    for doc in order:
        (shot,) = rnd.sample(pool, 1)
        ctx = (DESCRIPTION + f"ニュース記事:{shot['text']}\n要約:{shot['summary']}" + "\n\n"
               + f"ニュース記事:{doc['text']}\n要約:")
        budget = max_length - (len(sp.encode(doc["summary"])) + 10)
        out.append(tuple(sp.encode(harness_cut(ctx, budget, sp))[-(max_length - GEN):]))
    return out


class Recorder(ModelLM):
    """ModelLM without a model: records the token ids each request would feed the model."""

    def __init__(self, tokenizer, max_length: int):
        super().__init__(SimpleNamespace(config=SimpleNamespace(max_position_embeddings=max_length)), tokenizer,
                         max_length=max_length, batch_size=64)
        self.inputs: list[tuple[int, ...]] = []
        self.new_tokens: set[int] = set()

    def complete(self, requests):
        for r in requests:
            self.inputs.append(tuple(self.encode_prompt(r.prompt, r.max_new_tokens, r.bos)))
            self.new_tokens.add(r.max_new_tokens)
        return [""] * len(requests)


def moecpt_inputs(data_dir, max_length: int, out_dir) -> Recorder:
    lm = Recorder(load_tokenizer(None), max_length)
    runner.evaluate(lm, [T.TASKS["xlsum"]], data_dir, out_dir, {"model": "none"}, progress=False)
    return lm


@pytest.mark.parametrize("max_length", [1024, 2048, 4096])
def test_shared_items_match_the_harness(eval_data, sp, tmp_path, max_length):
    expected = harness_inputs(eval_data, max_length, sp)
    lm = moecpt_inputs(eval_data, max_length, tmp_path)
    assert len(lm.inputs) == len(expected) == 417
    assert lm.new_tokens == {GEN}
    assert Counter(lm.inputs) == Counter(expected)
    if max_length == 2048:  # the budget really cuts: most contexts were longer than it
        full = harness_inputs(eval_data, 100_000, sp)
        assert sum(a != b for a, b in zip(expected, full, strict=True)) > 300


def _long_data(tmp_path, eval_data) -> object:
    """Long synthetic articles from Japanese Wikipedia text, one with a first sentence longer than any share."""
    texts = [json.loads(x)["text"] for x in
             (eval_data.parent / "corpus/ja/wikipedia_train.jsonl").read_text("utf-8").splitlines()[:400]]
    articles = ["".join(texts[i:i + 40]) for i in range(0, 400, 40)]
    articles.append("長い見出し" * 1500 + "。短い文。")  # no sentence end for 7,500 characters
    data = tmp_path / "data"
    (data / "xlsum_ja").mkdir(parents=True)
    (data / "jp_harness_9b42d41_tasks.json").symlink_to(eval_data / "jp_harness_9b42d41_tasks.json")
    rows = [{"id": f"a{i}", "text": a, "summary": a[:40 + 7 * i].rstrip("。") + "。"} for i, a in enumerate(articles)]
    (data / "xlsum_ja/test.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    (data / "xlsum_ja/validation.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[::-1]), "utf-8")
    return data


@pytest.mark.parametrize("max_length", [1024, 2048, 4096])
def test_long_synthetic_articles_match_the_harness(eval_data, sp, tmp_path, max_length):
    data = _long_data(tmp_path, eval_data)
    expected = harness_inputs(data, max_length, sp)
    lm = moecpt_inputs(data, max_length, tmp_path / "out")
    assert Counter(lm.inputs) == Counter(expected)
    assert all(len(x) == max_length - GEN for x in expected)  # every context was over the model's window


def test_cut_keeps_whole_sentences_and_the_item_budget(eval_data, sp):
    """At 1024 tokens the item's article ends at a sentence end + SEP and fits its share of the budget."""
    lm = Recorder(load_tokenizer(None), 1024)
    budget = T.Budget(lm.count_tokens, 1024 - GEN, 1024, lm.head)
    item = T.TASKS["xlsum"].build(eval_data, T.load_protocol(eval_data), 3, budget)[0]
    assert item.prompt.startswith(DESCRIPTION + "ニュース記事:") and item.prompt.endswith("。\n要約:")
    article = "ニュース記事:" + item.prompt.split("ニュース記事:")[2][: -len("要約:")]
    share = (1024 - (len(sp.encode(item.gold)) + 10)) // 2
    assert len(sp.encode(article.removesuffix("。\n"))) <= share
