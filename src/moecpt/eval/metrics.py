"""Metric functions of the Swallow-MX protocol, each matching the reference tool that defined it.

Every score is on a 0-1 scale (BLEU and ROUGE are divided by 100). The tokenizers and scorers these metrics
rely on (rapidfuzz, sacrebleu, nagisa) are imported only when a metric needs them, so
`import moecpt.eval.metrics` is cheap and works without torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import unicodedata
from collections.abc import Callable, Sequence
from functools import lru_cache

# pip package that provides each lazily imported module (all in the `eval` extra)
PIP_PACKAGES = {
    "rapidfuzz": "rapidfuzz",
    "sacrebleu": "sacrebleu",
    "nagisa": "nagisa",
}
EVAL_EXTRA = "eval"


def missing_modules(modules: Sequence[str]) -> list[str]:
    """The modules of `modules` that cannot be imported (looked up without importing them)."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"this metric needs the Python package {module!r}: pip install {PIP_PACKAGES.get(module, module)} "
            f"(or pip install 'moecpt[{EVAL_EXTRA}]')"
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


def mgsm_gold(answer: str) -> int:
    """MGSM's gold answer as the integer `answer_number` the harness compares with: the TSV writes some with
    thousands separators ("2,125", "114,200"), which are dropped. Anything but an integer is a ValueError."""
    text = answer.strip().replace(",", "")
    if not re.fullmatch(r"-?[0-9]+", text):
        raise ValueError(f"MGSM answer {answer!r} is not an integer")
    return int(text)


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
# XL-Sum: ROUGE-2 F over the evaluated model's own tokenizer pieces, bootstrap mid as the JP harness reports it

# rouge_score's BootstrapAggregator defaults, and the seed the JP harness gives numpy when an evaluation starts
BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 1234


def _bigrams(words: Sequence[str]) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for pair in zip(words, words[1:], strict=False):
        counts[pair] = counts.get(pair, 0) + 1
    return counts


def rouge2_f(pred_words: Sequence[str], ref_words: Sequence[str]) -> float:
    """ROUGE-2 F-measure of two token lists, as rouge_score computes it (clipped bigram overlap)."""
    pred, ref = _bigrams(list(pred_words)), _bigrams(list(ref_words))
    overlap = sum(min(n, pred.get(g, 0)) for g, n in ref.items())
    precision = overlap / max(sum(pred.values()), 1)
    recall = overlap / max(sum(ref.values()), 1)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def rouge2_scores(preds: Sequence[str], refs: Sequence[str], tokenize: Callable[[str], list[str]]) -> list[float]:
    """Per-item ROUGE-2 F, both sides split by `tokenize` (text -> list of token strings).

    The JP harness's XL-Sum scorer is `rouge_score.RougeScorer(["rouge2"], tokenizer=T)` with T the evaluated
    model's tokenizer, so `tokenize` is that tokenizer's pieces (`tokenizer.tokenize`: "▁" marks and byte
    pieces such as "<0xE3>" included); rouge_score applies no other normalisation with a custom tokenizer.
    """
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    return [rouge2_f(tokenize(p), tokenize(r)) for p, r in zip(preds, refs, strict=True)]


def rouge2(preds: Sequence[str], refs: Sequence[str], tokenize: Callable[[str], list[str]]) -> float:
    """Mean ROUGE-2 F over items (0-1), tokens from `tokenize` (see `rouge2_scores`)."""
    return mean(rouge2_scores(preds, refs, tokenize))


def bootstrap_mid(values: Sequence[float], n_samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> float:
    """The mid (median) of rouge_score's BootstrapAggregator over per-item `values`.

    It draws `n_samples` resamples of the items with replacement (`np.random.choice(np.arange(n), size=n)`),
    takes each resample's mean and returns the 50th percentile of those means. The draws come from a numpy
    RandomState seeded with `seed`: the state of numpy's global generator when the JP harness aggregates
    XL-Sum (it calls `np.random.seed(1234)` when an evaluation starts and Swallow runs XL-Sum on its own).
    """
    import numpy as np

    if not values:
        return 0.0
    scores = np.asarray(values, dtype=np.float64)
    rng = np.random.RandomState(seed)
    means = np.empty(n_samples)
    for i in range(n_samples):
        means[i] = scores[rng.choice(np.arange(scores.shape[0]), size=scores.shape[0])].mean()
    return float(np.percentile(means, 50))


def rouge2_harness(preds: Sequence[str], refs: Sequence[str], tokenize: Callable[[str], list[str]]) -> float:
    """XL-Sum's score as the JP harness reports it (divided by 100): the seeded bootstrap mid of the per-item
    ROUGE-2 F over `tokenize`'s pieces. Items must be in the harness's order (its shuffled document order)."""
    return bootstrap_mid(rouge2_scores(preds, refs, tokenize))


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean, 0.0 for no values."""
    return sum(values) / len(values) if values else 0.0
