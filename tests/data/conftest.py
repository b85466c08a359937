"""Fixtures for the data pipeline tests: the shared corpora (or, without ../shared/data, moecpt's built-in
corpora laid out the same way: tests/corpora.py), tokenized once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from moecpt.data.preprocess import tokenize_corpus
from moecpt.data.tokenizer import Tokenizer, load_tokenizer

from ..corpora import DATA, HAVE_SHARED, SHARED_DATA, data_root

CORPUS = DATA / "corpus"  # ../shared/data/corpus or its stand-in (filled by `data_root()`)

# The Swallow-MX mixture: Japanese : English : math+code.
GROUPS = {
    "ja": [CORPUS / "ja"],
    "en": [CORPUS / "en"],
    "code": [CORPUS / "code", CORPUS / "math"],
}
SWALLOW_MX = {"ja": 0.644, "en": 0.256, "code": 0.1}


def require_data() -> Path:
    """../shared/data, for a test that needs one of its specific files (not just real text)."""
    if not HAVE_SHARED:
        pytest.skip(f"the shared corpora are not at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """../shared/data, or the directory of built-in corpora that stands in for it."""
    return data_root()


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    pytest.importorskip("mistral_common", reason="the default Mixtral tokenizer ships in mistral-common")
    return load_tokenizer()


@pytest.fixture(scope="session")
def shards(data_dir: Path, tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Shard prefixes of the ja / en / code groups of the corpora."""
    out = tmp_path_factory.mktemp("shards")
    prefixes = {}
    for name, inputs in GROUPS.items():
        prefixes[name] = str(out / name)
        tokenize_corpus(inputs, prefixes[name], progress=False)
    return prefixes


@pytest.fixture(scope="session")
def swallow_mixture(shards: dict[str, str]) -> str:
    """The Megatron-style mixture string over the corpora."""
    return " ".join(f"{w} {name}={shards[name]}" for name, w in SWALLOW_MX.items())
