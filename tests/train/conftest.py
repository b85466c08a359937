"""Small real corpora (tests/corpora.py, tokenized once per session) and a tiny training config for trainer tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from moecpt.config import load_config

from ..tiny_config import tiny_config_toml


@pytest.fixture(scope="session")
def corpora(tiny_corpora) -> dict[str, list[str]]:
    return tiny_corpora


@pytest.fixture(scope="session")
def shard_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shards")


@pytest.fixture
def write_config(tmp_path, corpora, shard_cache):
    """Write the tiny training config (tests/tiny_config.py) and return its path; `extra` TOML is appended."""

    def write(extra: str = "", name: str = "cfg.toml") -> Path:
        path = tmp_path / name
        path.write_text(tiny_config_toml(tmp_path / "run", shard_cache, corpora) + extra)
        return path

    return write


@pytest.fixture
def tiny_config(write_config):
    def make(*overrides: str, extra: str = ""):
        return load_config(write_config(extra), list(overrides))

    return make
