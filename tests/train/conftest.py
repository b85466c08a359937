"""Small real corpora (tokenized once per session) and a tiny training config for trainer tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from moecpt.train.config import load_config


@pytest.fixture(scope="session")
def corpora(shared_data) -> dict[str, list[str]]:
    c = shared_data / "corpus"
    return {
        "ja": [str(c / "ja" / "aozora_akutagawa.jsonl")],
        "en": [str(c / "en" / "tinyshakespeare.jsonl")],
    }


@pytest.fixture(scope="session")
def shard_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shards")


def toml_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{x}"' for x in items) + "]"


@pytest.fixture
def write_config(tmp_path, corpora, shard_cache):
    """Write a tiny training config (a small model, seq_len 32) and return its path; `extra` is appended."""

    def write(extra: str = "", name: str = "cfg.toml") -> Path:
        text = f"""
run_dir = "{tmp_path / 'run'}"
[model]
preset = "tiny"
overrides = {{ hidden_size = 32, intermediate_size = 48, num_attention_heads = 4, num_key_value_heads = 2 }}
[data]
mixture = "0.7 ja 0.3 en"
seq_len = 32
cache_dir = "{shard_cache}"
valid_fraction = 0.05
valid_max_documents = 8
[data.corpora]
ja = {toml_list(corpora['ja'])}
en = {toml_list(corpora['en'])}
[optimizer]
lr = 3e-3
min_lr = 3e-4
[schedule]
warmup_steps = 3
[training]
steps = 10
global_batch = 4
micro_batch = 2
seed = 7
[checkpoint]
interval = 4
keep_last = 10
export_at_end = false
[logging]
interval = 1
progress = false
val_batches = 2
"""
        path = tmp_path / name
        path.write_text(text + extra)
        return path

    return write


@pytest.fixture
def tiny_config(write_config):
    def make(*overrides: str, extra: str = ""):
        return load_config(write_config(extra), list(overrides))

    return make
