"""Golden tests of the metrics against the reference libraries the original tools used."""

from __future__ import annotations

import json
import random

import pytest

from moecpt.eval import metrics

# Pairs chosen to hit fuzzywuzzy's processing: Japanese, full-width forms, punctuation-only strings, Latin-1
# letters (dropped by its force_ascii), case, token order, commas, empty strings.
PAIRS = [
    ("東京都", "東京"),
    ("あまちゃん", "あまちゃん"),
    ("ファイナルファンタジーXIII", "ファイナルファンタジー13"),
    ("。", "、"),
    ("", "a"),
    ("", ""),
    ("Hello World", "world hello"),
    ("ジョン・レノン,ポール・マッカートニー", "ポール・マッカートニー,ジョン・レノン"),
    ("café", "cafe"),
    ("é", "e"),
    ("4年", "4年に一度"),
    ("YES", "yes"),
    ("2014年7月10日", "2014年7月10日。"),
    ("ＡＢＣ　ｄｅｆ", "abc def"),
    ("三陸海岸の中部から南部,房総半島南部", "房総半島南部"),
    ("  leading and trailing  ", "leading trailing and"),
    ("森田成一", "清原果耶"),
    ("1", "2"),
]


def _random_pairs(n: int) -> list[tuple[str, str]]:
    rnd = random.Random(0)
    alphabet = list("あいうえおかきくけこ東京都大阪府年月日アイウエオabcABC123 ,.、。・（）-") + ["é", "ß", "×"]
    out = []
    for _ in range(n):
        a = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 12)))
        b = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 12)))
        out.append((a, b))
    return out


def test_char_f1_equals_fuzzywuzzy_token_sort_ratio():
    fuzz = pytest.importorskip("fuzzywuzzy.fuzz", reason="golden reference: pip install fuzzywuzzy python-Levenshtein")
    pytest.importorskip("Levenshtein", reason="fuzzywuzzy must use python-Levenshtein, as llm-jp-eval did")
    for pred, gold in PAIRS + _random_pairs(2000):
        assert metrics.char_f1(pred, gold) == fuzz.token_sort_ratio(pred, gold) / 100, (pred, gold)


def test_char_f1_on_real_answers_equals_fuzzywuzzy(eval_data):
    """Every JEMHopQA dev answer against every other one's neighbour: real Japanese strings."""
    fuzz = pytest.importorskip("fuzzywuzzy.fuzz", reason="golden reference: pip install fuzzywuzzy python-Levenshtein")
    answers = [r["answer"] for r in json.loads((eval_data / "jemhopqa/corpus/dev.json").read_text("utf-8"))]
    for a, b in zip(answers, answers[1:] + answers[:1], strict=True):
        for pred in (a, b, a + b, metrics.nfkc(a)):
            assert metrics.char_f1(pred, b) == fuzz.token_sort_ratio(pred, b) / 100, (pred, b)


def test_exact_match():
    assert metrics.exact_match("2", "2") == 1.0
    assert metrics.exact_match(" 2", "2") == 0.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("答えは1,234です。", 1234.0),
        ("1,000,000", 1000000.0),
        ("気温は-5度", -5.0),
        ("答えは11。", 11.0),
        ("答えは8.", 8.0),
        ("答えは8です.", None),  # the lone "." after the text is the last match, as in the harness
        ("3.5ドル", 3.5),
        ("5+6=11。答えは11です。", 11.0),
        ("最初は3個、今は12個", 12.0),
        ("数字はない", None),
        ("", None),
        ("...", None),
        (",", None),
        ("1.2.3", None),  # not a float: invalid, as in the harness
    ],
)
def test_last_number(text, expected):
    assert metrics.last_number(text) == expected


def test_mgsm_correct():
    assert metrics.mgsm_correct("つまり5+6=11。答えは11です。", 11) == 1.0
    assert metrics.mgsm_correct("答えは1,000です", 1000) == 1.0
    assert metrics.mgsm_correct("答えは11.0です", 11) == 1.0
    assert metrics.mgsm_correct("答えは11.5です", 11) == 0.0  # not an integer
    assert metrics.mgsm_correct("答えは11です。合計12", 11) == 0.0  # the last number counts
    assert metrics.mgsm_correct("わかりません", 0) == 0.0


def test_gsm8k_strict_match():
    gold = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    assert metrics.gsm8k_strict_match("She sold 72 in all.\n#### 72", gold) == 1.0
    assert metrics.gsm8k_strict_match("#### 1,072", "#### 1072") == 1.0
    assert metrics.gsm8k_strict_match("The answer is 72.", gold) == 0.0  # strict: needs '#### '
    assert metrics.gsm8k_strict_match("#### 71", gold) == 0.0
    assert metrics.gsm8k_strict_match("So 72 clips.\n#### 72.", gold) == 1.0  # a final "." is ignored
    assert metrics.gsm8k_strict_match("#### -3", "#### -3") == 1.0


def test_bleu_en_matches_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps = ["The cat sat on the mat.", "Police arrested the man on Monday.", "It was a sunny day"]
    refs = ["The cat is sitting on the mat.", "On Monday, police arrested the man.", "It was a sunny day."]
    assert metrics.bleu_en(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score / 100, abs=1e-12)
    assert metrics.bleu_en(refs, refs) == pytest.approx(1.0)


def test_bleu_ja_segments_with_nagisa_then_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    nagisa = pytest.importorskip("nagisa")
    hyps = ["アマリさんの祖母は「とても痛い」と言った。", "警察は男を月曜日に逮捕した。"]
    refs = ["アマリさんの祖母シンシア・アレンさんは、「とても痛ましいことだ」と語った。", "月曜日、警察は男を逮捕した。"]

    def seg(t):
        return " ".join(nagisa.tagging(t.strip()).words)

    expected = sacrebleu.corpus_bleu([seg(h) for h in hyps], [[seg(r) for r in refs]]).score / 100
    assert metrics.bleu_ja(hyps, refs) == pytest.approx(expected, abs=1e-12)
    assert 0.0 < metrics.bleu_ja(hyps, refs) < 1.0
    # without segmentation a Japanese sentence is one "word" and BLEU collapses: the segmentation matters
    assert metrics.bleu_en(hyps, refs) < metrics.bleu_ja(hyps, refs)


def test_rouge2_ja_matches_rouge_score_with_mecab_words():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    fugashi = pytest.importorskip("fugashi")
    tagger = fugashi.Tagger("-Owakati")

    class Words:
        def tokenize(self, text):
            return tagger.parse(text).split()

    scorer = rouge_scorer.RougeScorer(["rouge2"], tokenizer=Words())
    preds = ["米誌プレイボーイは女性のヌード写真の掲載を止める。", "首脳会談はシンガポールで開かれる", "", "同じ文です。"]
    refs = ["米誌プレイボーイは女性のヌード写真の掲載を止める方針。", "米朝首脳会談は6月12日にシンガポールで開催される。",
            "要約", "同じ文です。"]
    expected = [scorer.score(r, p)["rouge2"].fmeasure for p, r in zip(preds, refs, strict=True)]
    assert 0.0 < expected[0] < 1.0 and expected[3] == 1.0
    assert metrics.rouge2_ja(preds, refs) == pytest.approx(sum(expected) / len(expected), abs=1e-12)


def test_metrics_import_without_torch():
    import subprocess
    import sys

    code = "import sys, moecpt.eval.metrics, moecpt.eval.tasks; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_missing_metric_package_names_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "nagisa", None)  # makes `import nagisa` fail
    metrics._nagisa.cache_clear()
    try:
        with pytest.raises(ImportError, match="pip install nagisa"):
            metrics.bleu_ja(["猫"], ["猫"])
    finally:
        metrics._nagisa.cache_clear()
