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


# fixed Japanese (prediction, reference) pairs: XL-Sum-like summaries, partial overlaps, rare kanji (byte pieces),
# an empty prediction, a one-piece reference, Latin text with spaces, identical strings
ROUGE_PAIRS = [
    ("米誌プレイボーイは女性のヌード写真の掲載を止める。", "米誌プレイボーイは女性のヌード写真の掲載を止める方針。"),
    ("首脳会談はシンガポールで開かれる", "米朝首脳会談は6月12日にシンガポールで開催される。"),
    ("", "要約"),
    ("鬱蒼とした森で麒麟を見た", "麒麟が鬱蒼とした森にいた。"),
    ("猫", "猫"),
    ("英BBC によると、Apple は新型 iPhone を発表した。", "Apple が新しい iPhone を発表したと BBC が伝えた。"),
    ("同じ文です。", "同じ文です。"),
    ("東京都は24日、新たに500人の感染を確認した。", "東京都で新たに500人が感染、24日。"),
]


@pytest.fixture(scope="module")
def mixtral():
    from moecpt.data.tokenizer import load_tokenizer

    return load_tokenizer(None)  # the real Mixtral-8x7B tokenizer (SentencePiece)


def _reference_pieces(mixtral):
    """The Mixtral tokenizer's pieces as the harness got them: transformers' tokenizer.tokenize where it can be
    built offline from the SentencePiece model (needs protobuf), else SentencePiece's own piece strings."""
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=mixtral.path)
    try:
        import shutil
        import tempfile

        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as d:
            shutil.copyfile(mixtral.path, f"{d}/tokenizer.model")
            hf = AutoTokenizer.from_pretrained(d)
        if hf.tokenize("米朝首脳") == sp.encode("米朝首脳", out_type=str):
            return hf.tokenize
    except Exception:  # no transformers/protobuf: the SentencePiece pieces are the same strings
        pass
    return lambda text: sp.encode(text, out_type=str)


def test_rouge2_is_rouge_score_over_the_mixtral_pieces(mixtral):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    reference = _reference_pieces(mixtral)

    class Pieces:
        def tokenize(self, text):
            return reference(text)

    scorer = rouge_scorer.RougeScorer(["rouge2"], tokenizer=Pieces())
    preds, refs = [p for p, _ in ROUGE_PAIRS], [r for _, r in ROUGE_PAIRS]
    expected = [scorer.score(r, p)["rouge2"].fmeasure for p, r in ROUGE_PAIRS]
    assert 0.0 < expected[0] < 1.0 and expected[2] == 0.0 and expected[6] == 1.0
    assert metrics.rouge2_scores(preds, refs, mixtral.pieces) == pytest.approx(expected, abs=1e-12)
    assert metrics.rouge2(preds, refs, mixtral.pieces) == pytest.approx(sum(expected) / len(expected), abs=1e-9)
    # the pieces are the tokenizer's strings: the word-boundary mark and byte pieces for rare kanji
    assert mixtral.pieces("鬱蒼")[0] == "▁" and "<0xE9>" in mixtral.pieces("鬱蒼")
    # a different tokenization gives a different score: the tokenizer matters
    assert metrics.rouge2(preds, refs, list) != pytest.approx(metrics.rouge2(preds, refs, mixtral.pieces))


def test_rouge2_harness_is_the_seeded_bootstrap_mid(mixtral):
    """rouge_score's BootstrapAggregator after np.random.seed(1234), as the harness ran it for XL-Sum."""
    np = pytest.importorskip("numpy")
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scoring = pytest.importorskip("rouge_score.scoring")

    class Pieces:
        def tokenize(self, text):
            return mixtral.pieces(text)

    pairs = ROUGE_PAIRS * 5 + [(r, p) for p, r in ROUGE_PAIRS]
    scorer = rouge_scorer.RougeScorer(["rouge2"], tokenizer=Pieces())
    state = np.random.get_state()
    try:
        np.random.seed(1234)
        agg = scoring.BootstrapAggregator()
        for p, r in pairs:
            agg.add_scores(scorer.score(r, p))
        expected = agg.aggregate()["rouge2"].mid.fmeasure
    finally:
        np.random.set_state(state)
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    got = metrics.rouge2_harness(preds, refs, mixtral.pieces)
    assert got == pytest.approx(expected, abs=1e-12)
    assert got != metrics.rouge2(preds, refs, mixtral.pieces)  # the mid is not the mean
    assert metrics.rouge2_harness(preds[::-1], refs[::-1], mixtral.pieces) != got  # order matters, as upstream


def test_mgsm_gold_on_every_row(eval_data):
    """Every answer of mgsm_ja.tsv parses to the integer answer_number; the English file of the same problems
    (same row order) agrees, and the four rows with thousands separators give the harness's numbers."""
    import csv

    def rows(name):
        with (eval_data / "mgsm" / name).open(encoding="utf-8", newline="") as f:
            return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))

    ja, en = rows("mgsm_ja.tsv"), rows("mgsm_en.tsv")
    assert len(ja) == len(en) == 250
    for (_, a), (_, b) in zip(ja, en, strict=True):
        expected = int(b.replace(",", ""))
        assert metrics.mgsm_gold(a) == expected and isinstance(metrics.mgsm_gold(a), int)
    assert [metrics.mgsm_gold(ja[i][1]) for i in (146, 201, 230, 249)] == [2125, 114200, 276000, 5600]
    assert metrics.mgsm_correct("答えは2,125です", metrics.mgsm_gold("2,125")) == 1.0
    with pytest.raises(ValueError, match="not an integer"):
        metrics.mgsm_gold("12.5")


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
