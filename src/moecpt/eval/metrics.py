"""Metric functions of the Swallow-MX protocol, each matching the reference tool that defined it.

Every score is on a 0-1 scale (BLEU and ROUGE are divided by 100). The tokenizers and scorers these metrics
rely on (rapidfuzz, sacrebleu, fugashi + unidic-lite, nagisa, rouge-score) are imported only when a metric
needs them, so `import moecpt.eval.metrics` is cheap and works without torch.
"""

from __future__ import annotations

import importlib
import re
import unicodedata
from collections.abc import Sequence
from functools import lru_cache

# pip package that provides each lazily imported module
_PIP_NAME = {
    "rapidfuzz": "rapidfuzz",
    "sacrebleu": "sacrebleu",
    "fugashi": "fugashi unidic-lite",
    "nagisa": "nagisa",
    "rouge_score": "rouge-score",
}


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"this metric needs the Python package {module!r}: pip install {_PIP_NAME.get(module, module)} "
            f"(or pip install 'moecpt[eval]')"
        ) from e


def nfkc(text: str) -> str:
    """NFKC normalisation, applied by llm-jp-eval to predictions and references alike."""
    return unicodedata.normalize("NFKC", text)


# ---------------------------------------------------------------------------------------------------------------
# llm-jp-eval v1.0: exact match and "char_f1" (really fuzzywuzzy's token_sort_ratio)


def exact_match(pred: str, gold: str) -> float:
    """1.0 when the strings are equal, else 0.0 (llm-jp-eval compares the NFKC-normalised strings)."""
    return 1.0 if pred == gold else 0.0


# fuzzywuzzy's full_process: drop the code points 128-255 (its "force_ascii"), turn every non-word character
# into a space, lower-case, strip. Characters above 255 (all of Japanese) survive.
_LATIN1_HIGH = {c: None for c in range(128, 256)}
_NON_WORD = re.compile(r"(?ui)\W")


def _fuzz_process(text: str) -> str:
    text = text.translate(_LATIN1_HIGH)
    return _NON_WORD.sub(" ", text).lower().strip()


def _sorted_tokens(text: str) -> str:
    return " ".join(sorted(_fuzz_process(text).split())).strip()


def char_f1(pred: str, gold: str) -> float:
    """llm-jp-eval's "char_f1": `fuzzywuzzy.fuzz.token_sort_ratio(pred, gold) / 100`.

    Both strings are cleaned (non-word characters become spaces, lower case), their whitespace tokens sorted and
    re-joined, and compared with the Levenshtein ratio (python-Levenshtein's, which rapidfuzz's Indel similarity
    equals). The percentage is rounded to an integer with Python's `round` as fuzzywuzzy does; equal strings
    score 1 even when both clean to nothing, and one empty side scores 0.
    """
    a, b = _sorted_tokens(pred), _sorted_tokens(gold)
    if a == b:
        return 1.0
    if not a or not b:
        return 0.0
    return int(round(100 * _indel().normalized_similarity(a, b))) / 100


@lru_cache(maxsize=1)
def _indel():
    _require("rapidfuzz")
    from rapidfuzz.distance import Indel

    return Indel


# ---------------------------------------------------------------------------------------------------------------
# MGSM (JP harness) and GSM8K (lm-evaluation-harness) answer extraction

_NUMBER = re.compile(r"-?[0-9.,]+")


def last_number(text: str) -> float | None:
    """The last number in `text` as the JP harness reads MGSM completions, or None when there is none.

    It takes the last run of digits, dots and commas (with an optional leading minus), strips dots at its ends,
    drops commas, and parses the rest as a float: "1,234" -> 1234.0, "-5." -> -5.0, "3.5" -> 3.5, "..." -> None.
    """
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    number = matches[-1].strip(".").replace(",", "")
    try:
        return float(number)
    except ValueError:
        return None


def mgsm_correct(completion: str, answer: float) -> float:
    """1.0 when the completion's last number is an integer equal to `answer`, else 0.0."""
    value = last_number(completion)
    if value is None or not value.is_integer():
        return 0.0
    return 1.0 if int(value) == answer else 0.0


_GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")


def _gsm8k_normalise(number: str) -> str:
    # lm-evaluation-harness's exact_match for GSM8K ignores commas, "$" and a final "."
    return re.sub(r"\.$", "", number.strip().replace(",", "").replace("$", ""))


def gsm8k_answer(text: str) -> str | None:
    """The number after the first `#### ` in `text`, normalised (commas, a final '.' removed), or None."""
    match = _GSM8K_STRICT.search(text)
    return None if match is None else _gsm8k_normalise(match.group(1))


def gsm8k_strict_match(completion: str, gold_answer: str) -> float:
    """lm-evaluation-harness's GSM8K "strict-match": the `#### N` of the completion equals the gold answer's
    final number (the text after its last `####`)."""
    pred = gsm8k_answer(completion)
    gold = _gsm8k_normalise(gold_answer.split("####")[-1])
    return 1.0 if pred is not None and pred == gold else 0.0


# ---------------------------------------------------------------------------------------------------------------
# WMT20: corpus BLEU (sacrebleu, 13a), Japanese segmented into words by nagisa first


@lru_cache(maxsize=1)
def _nagisa():
    return _require("nagisa")


def nagisa_words(text: str) -> str:
    """`text` segmented into words by nagisa and joined with spaces, as the JP harness does before BLEU."""
    return " ".join(_nagisa().tagging(text.strip()).words)


def bleu_en(preds: Sequence[str], refs: Sequence[str]) -> float:
    """sacrebleu corpus BLEU with its default 13a tokenizer, one reference per segment, divided by 100."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    if not preds:
        return 0.0
    sacrebleu = _require("sacrebleu")
    return sacrebleu.corpus_bleu(list(preds), [list(refs)]).score / 100


def bleu_ja(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus BLEU for Japanese output: nagisa word segmentation of both sides, then `bleu_en`."""
    return bleu_en([nagisa_words(p) for p in preds], [nagisa_words(r) for r in refs])


# ---------------------------------------------------------------------------------------------------------------
# XL-Sum: ROUGE-2 F over MeCab words


@lru_cache(maxsize=1)
def _mecab():
    fugashi = _require("fugashi")
    try:
        return fugashi.Tagger("-Owakati")
    except RuntimeError as e:  # no dictionary found
        raise ImportError("fugashi found no MeCab dictionary: pip install unidic-lite") from e


def mecab_words(text: str) -> list[str]:
    """`text` split into words by MeCab (fugashi with unidic-lite, -Owakati)."""
    return _mecab().parse(text).split()


def _bigrams(words: list[str]) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for pair in zip(words, words[1:], strict=False):
        counts[pair] = counts.get(pair, 0) + 1
    return counts


def rouge2_f(pred_words: list[str], ref_words: list[str]) -> float:
    """ROUGE-2 F-measure of two word lists, as rouge_score computes it (clipped bigram overlap)."""
    pred, ref = _bigrams(pred_words), _bigrams(ref_words)
    overlap = sum(min(n, ref.get(g, 0)) for g, n in pred.items())
    n_pred, n_ref = sum(pred.values()), sum(ref.values())
    precision = overlap / max(n_pred, 1)
    recall = overlap / max(n_ref, 1)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def rouge2_ja(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Mean ROUGE-2 F over items, Japanese split into MeCab words, on a 0-1 scale.

    The JP harness reports the mid point of rouge_score's BootstrapAggregator, an unseeded bootstrap estimate
    of this same mean; the plain mean is its deterministic value.
    """
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    if not preds:
        return 0.0
    scores = [rouge2_f(mecab_words(p), mecab_words(r)) for p, r in zip(preds, refs, strict=True)]
    return sum(scores) / len(scores)


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean, 0.0 for no values."""
    return sum(values) / len(values) if values else 0.0
