"""The tiny training config the trainer and distributed tests share: a small model (4 experts, hidden 32)
on two small real corpora, seq_len 32; each test suite changes what it needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moecpt.config import config_from_dict, to_toml


def tiny_corpora(shared_data: Path) -> dict[str, list[str]]:
    c = shared_data / "corpus"
    return {"ja": [str(c / "ja" / "aozora_akutagawa.jsonl")], "en": [str(c / "en" / "tinyshakespeare.jsonl")]}


def tiny_config_toml(run_dir: Path, cache_dir: Path, corpora: dict[str, list[str]],
                     changes: dict[str, dict[str, Any]] | None = None, **top: Any) -> str:
    """The config as TOML; `changes` maps a section to the keys it changes, `top` sets top-level keys."""
    data: dict[str, Any] = {
        "run_dir": str(run_dir),
        "model": {"preset": "tiny", "overrides": {"hidden_size": 32, "intermediate_size": 48,
                                                  "num_attention_heads": 4, "num_key_value_heads": 2}},
        "data": {"mixture": "0.7 ja 0.3 en", "seq_len": 32, "cache_dir": str(cache_dir), "valid_fraction": 0.05,
                 "valid_max_documents": 8, "corpora": corpora},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4},
        "schedule": {"warmup_steps": 3},
        "training": {"steps": 10, "global_batch": 4, "micro_batch": 2, "seed": 7},
        "checkpoint": {"interval": 4, "keep_last": 10, "export_at_end": False},
        "logging": {"interval": 1, "progress": False, "val_batches": 2},
        **top,
    }
    for section, keys in (changes or {}).items():
        data[section] = {**data[section], **keys}
    return to_toml(config_from_dict(data, "tests/tiny_config.py"))
