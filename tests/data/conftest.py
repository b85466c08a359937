"""Fixtures for the data pipeline tests: the shared corpora, tokenized once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from moecpt.data.preprocess import tokenize_corpus
from moecpt.data.tokenizer import Tokenizer, load_tokenizer

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CORPUS = DATA / "corpus"

# The Swallow-MX mixture: Japanese : English : math+code.
GROUPS = {
    "ja": [CORPUS / "ja"],
    "en": [CORPUS / "en"],
    "code": [CORPUS / "code", CORPUS / "math"],
}
SWALLOW_MX = {"ja": 0.644, "en": 0.256, "code": 0.1}


def require_data() -> Path:
    if not CORPUS.is_dir():
        pytest.skip(f"shared corpora not found at {DATA} (tests read ../shared/data beside the repo)")
    return DATA


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return require_data()


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    pytest.importorskip("mistral_common", reason="the default Mixtral tokenizer ships in mistral-common")
    return load_tokenizer()


@pytest.fixture(scope="session")
def shards(data_dir: Path, tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Shard prefixes of the ja / en / code groups of the shared corpora."""
    out = tmp_path_factory.mktemp("shards")
    prefixes = {}
    for name, inputs in GROUPS.items():
        prefixes[name] = str(out / name)
        tokenize_corpus(inputs, prefixes[name], progress=False)
    return prefixes


@pytest.fixture(scope="session")
def swallow_mixture(shards: dict[str, str]) -> str:
    """The Megatron-style mixture string over the shared corpora."""
    return " ".join(f"{w} {name}={shards[name]}" for name, w in SWALLOW_MX.items())
