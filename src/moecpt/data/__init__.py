"""Data pipeline: JSON Lines corpora -> Megatron token shards -> weighted, packed, resumable sample stream.

Modules: `tokenizer` (load_tokenizer), `indexed` (the .bin/.idx format), `preprocess` (tokenize_corpus,
cached_shard), `mixture` (MixtureDataset), `loader` (MixtureLoader, DataLoaderState), `cli`. See docs/data.md.
Nothing here imports torch: samples and batches are numpy arrays. The names below load on first use, so that
`moecpt --help` and tokenizer worker processes stay light.
"""

from __future__ import annotations

_LAZY = {
    "Tokenizer": "moecpt.data.tokenizer",
    "load_tokenizer": "moecpt.data.tokenizer",
    "IndexedShard": "moecpt.data.indexed",
    "ShardWriter": "moecpt.data.indexed",
    "tokenize_corpus": "moecpt.data.preprocess",
    "cached_shard": "moecpt.data.preprocess",
    "TokenizeReport": "moecpt.data.preprocess",
    "MixtureEntry": "moecpt.data.mixture",
    "MixtureDataset": "moecpt.data.mixture",
    "ValidationDataset": "moecpt.data.mixture",
    "DataExhaustedError": "moecpt.data.mixture",
    "parse_mixture": "moecpt.data.mixture",
    "resolve_mixture": "moecpt.data.mixture",
    "shared_corpus_mixture": "moecpt.data.mixture",
    "MixtureLoader": "moecpt.data.loader",
    "DataLoaderState": "moecpt.data.loader",
    "validation_batches": "moecpt.data.loader",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moecpt.data' has no attribute {name!r}")
