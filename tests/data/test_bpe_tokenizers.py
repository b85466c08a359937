"""Byte-level BPE tokenizers without BOS (Qwen3, OLMoE) through the data pipeline: loading, special tokens,
vocabulary size, byte counts, shards, the mixture, and the check of token ids against the embedding rows.

The real tokenizer files are read from ../shared/data/tokenizers (skipped without it); the texts are the first
few documents of the shared corpora (or their built-in stand-ins)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from moecpt.data.indexed import IndexedShard, meta_path
from moecpt.data.mixture import MixtureDataset, resolve_mixture
from moecpt.data.preprocess import tokenize_corpus
from moecpt.data.tokenizer import load_tokenizer
from moecpt.errors import UserError

from ..corpora import SHARED_DATA, corpus_file

TOKENIZERS = SHARED_DATA / "tokenizers"
CHECK_SENTENCE = "吾輩は猫である。名前はまだ無い。"  # the tokenizers README's check sentence
# name: (vocabulary size, EOS, pad, tokens of the check sentence), from ../shared/data/tokenizers/README.md
EXPECTED = {"qwen3": (151669, 151643, 151643, 12), "olmoe": (50280, 50279, 1, 19)}


def real_tokenizer_dir(name: str) -> Path:
    path = TOKENIZERS / name
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"the real {name} tokenizer is not at {path}")
    return path


def first_texts(rel: str, n: int) -> list[str]:
    texts = []
    with corpus_file(rel).open(encoding="utf-8") as f:
        for line in itertools.islice(f, n):
            texts.append(json.loads(line)["text"])
    return texts


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return first_texts("ja/wikipedia_dev.jsonl", 6) + first_texts("en/wikitext2_valid.jsonl", 6)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_tokenizer_loads_from_directory_and_file(name):
    path = real_tokenizer_dir(name)
    vocab, eos, pad, n_check = EXPECTED[name]
    for tok in (load_tokenizer(path), load_tokenizer(path / "tokenizer.json")):
        assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (vocab, None, eos, pad)
        assert tok.decode([tok.eos_id]) == "<|endoftext|>"
        ids = tok.encode(CHECK_SENTENCE)
        assert len(ids) == n_check and tok.decode(ids) == CHECK_SENTENCE
        assert tok.path.endswith("tokenizer.json")


def test_qwen3_documents_end_with_endoftext_not_the_chat_eos():
    """The shipped tokenizer_config.json is the post-trained models' (eos <|im_end|>); pretraining documents
    end with <|endoftext|>, which is what a shard's documents must end with."""
    path = real_tokenizer_dir("qwen3")
    assert json.loads((path / "tokenizer_config.json").read_text("utf-8"))["eos_token"] == "<|im_end|>"
    assert load_tokenizer(path).eos_id == 151643


def test_vocab_size_is_the_largest_id_plus_one(tmp_path):
    """Added tokens count, including ones placed after a gap in the ids."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"a": 0, "b": 1, "ab": 2}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [("a", "b")]))
    tok.add_special_tokens(["<|endoftext|>"])
    data = json.loads(tok.to_str())
    data["added_tokens"][0]["id"] = 10  # an id past a gap
    data["model"]["vocab"]["<|endoftext|>"] = 10
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    t = load_tokenizer(tmp_path)
    assert t.vocab_size == 11 and t.eos_id == 10 and t.bos_id is None


def test_tokenizer_config_null_bos_means_no_bos(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE({"a": 0}, []))
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path).bos_id == 1
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "</s>"}))
    t = load_tokenizer(tmp_path)
    assert t.bos_id is None and t.eos_id == 2


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_byte_length_is_exact_and_additive(name, texts):
    """Each byte-level token is a fixed byte string: the bytes of a document's tokens are the text's bytes,
    split anywhere (also inside a multi-byte character); special tokens count zero."""
    tok = load_tokenizer(real_tokenizer_dir(name))
    for text in texts + [CHECK_SENTENCE]:
        ids = tok.encode(text)
        assert tok.byte_length(ids) == len(text.encode("utf-8"))
        for cut in (1, 2, len(ids) // 2):
            assert tok.byte_length(ids[:cut]) + tok.byte_length(ids[cut:]) == len(text.encode("utf-8"))
        assert tok.byte_length(ids + [tok.eos_id]) == len(text.encode("utf-8"))
    if name == "olmoe":  # some kanji are spelled as single bytes
        assert min(tok.byte_length([i]) for i in tok.encode(CHECK_SENTENCE)) == 1


def jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_tokenize_shards_without_bos(name, texts, tmp_path):
    """Each document is its tokens then EOS (no BOS: the tokenizer has none); --append-bos is refused."""
    path = real_tokenizer_dir(name)
    tok = load_tokenizer(path)
    src = jsonl(tmp_path / "docs.jsonl", texts)
    tokenize_corpus([src], tmp_path / "shard", tokenizer=path, progress=False)
    shard = IndexedShard(tmp_path / "shard")
    assert shard.dtype == (np.int32 if name == "qwen3" else np.uint16)
    assert shard.num_documents == len(texts)
    for i, text in enumerate(texts):
        assert shard.document(i).tolist() == tok.encode(text) + [tok.eos_id]
    recorded = shard.meta["tokenizer"]
    assert (recorded["vocab_size"], recorded["bos_id"], recorded["eos_id"]) == (tok.vocab_size, None, tok.eos_id)
    with pytest.raises(UserError, match="no BOS token"):
        tokenize_corpus([src], tmp_path / "bos", tokenizer=path, append_bos=True, progress=False)


def test_mixture_tokenizes_json_lines_with_qwen3(texts, tmp_path):
    """The trainer's path: JSON Lines sources tokenized into the cache on first use, then packed."""
    path = real_tokenizer_dir("qwen3")
    tok = load_tokenizer(path)
    ja, en = jsonl(tmp_path / "ja.jsonl", texts[:6]), jsonl(tmp_path / "en.jsonl", texts[6:])
    entries = resolve_mixture(f"0.6 ja={ja} 0.4 en={en}", tmp_path / "cache", tokenizer=tok.path)
    dataset = MixtureDataset(entries, seq_len=64, valid_fraction=0.2)
    assert dataset.tokenizer_fingerprint == tok.fingerprint
    sample = dataset[0]["tokens"]
    assert sample.max() < tok.vocab_size and tok.bos_id is None
    starts = np.flatnonzero(dataset[0]["position_ids"] == 0)[1:]
    assert all(sample[s - 1] == tok.eos_id for s in starts)  # a document starts right after an EOS


def test_token_ids_beyond_the_embedding_rows_are_refused(texts, tmp_path):
    pytest.importorskip("torch")
    from moecpt.train.setup import check_token_ids

    qwen = load_tokenizer(real_tokenizer_dir("qwen3"))
    olmoe = load_tokenizer(real_tokenizer_dir("olmoe"))
    tokenize_corpus([jsonl(tmp_path / "ja.jsonl", texts)], tmp_path / "ja", tokenizer=qwen.path, progress=False)
    dataset = MixtureDataset("1.0 ja=" + str(tmp_path / "ja"), seq_len=32, valid_fraction=0.0)
    check_token_ids(qwen, dataset, 151936)  # more embedding rows than token ids: normal
    with pytest.raises(UserError, match="token ids up to 151668 but the model has 151000 embedding rows"):
        check_token_ids(qwen, dataset, 151000)
    # Shards made with another tokenizer than the run's: the sidecar's vocabulary exceeds the rows, so the
    # shard's largest id is read and named, with the corpus and the fix.
    with pytest.raises(UserError, match=r"corpus 'ja': shard .*ja \(tokenized with .*qwen3.*\) holds token id"):
        check_token_ids(olmoe, dataset, 50304)
    meta_path(tmp_path / "ja").unlink()  # a foreign shard (no sidecar): its ids are read
    dataset = MixtureDataset("1.0 ja=" + str(tmp_path / "ja"), seq_len=32, valid_fraction=0.0)
    largest = int(np.asarray(IndexedShard(tmp_path / "ja").tokens).max())
    with pytest.raises(UserError, match=f"holds token id {largest}, .* Re-tokenize it"):
        check_token_ids(olmoe, dataset, 50304)
    check_token_ids(olmoe, dataset, largest + 1)  # below the rows: accepted (the tokenizer fits as well)
