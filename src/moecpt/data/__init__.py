"""Data pipeline: JSON Lines corpora -> Megatron token shards -> weighted, packed, resumable sample stream.

Modules: `tokenizer` (load_tokenizer), `indexed` (the .bin/.idx format), `preprocess` (tokenize_corpus,
cached_shard), `mixture` (MixtureDataset), `loader` (MixtureLoader, DataLoaderState), `cli`. See docs/data.md.
Nothing here imports torch: samples and batches are numpy arrays, and the tokenizer libraries load on first
use, so tokenizer worker processes and the command line stay light.
"""

from __future__ import annotations

from moecpt.data.indexed import IndexedShard, ShardWriter
from moecpt.data.loader import DataLoaderState, MixtureLoader, validation_batches
from moecpt.data.mixture import (
    DataExhaustedError,
    Mixture,
    MixtureDataset,
    MixtureEntry,
    ValidationDataset,
    parse_mixture,
    resolve_mixture,
    shared_corpus_mixture,
)
from moecpt.data.preprocess import TokenizeReport, cached_shard, tokenize_corpus
from moecpt.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "DataExhaustedError",
    "DataLoaderState",
    "IndexedShard",
    "Mixture",
    "MixtureDataset",
    "MixtureEntry",
    "MixtureLoader",
    "ShardWriter",
    "TokenizeReport",
    "Tokenizer",
    "ValidationDataset",
    "cached_shard",
    "load_tokenizer",
    "parse_mixture",
    "resolve_mixture",
    "shared_corpus_mixture",
    "tokenize_corpus",
    "validation_batches",
]
