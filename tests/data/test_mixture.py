"""The weighted mixture: shares, packing, a full pass seeing each sample once, repeats, validation split."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from moecpt.cli import main
from moecpt.data.mixture import DataExhaustedError, MixtureDataset, MixtureEntry, block_pattern, parse_mixture
from moecpt.data.preprocess import tokenize_corpus
from moecpt.errors import UserError

from ..corpora import corpus_file
from .conftest import SWALLOW_MX


def test_parse_megatron_string_and_lists():
    entries = parse_mixture("0.644 data/ja 0.256 data/en 0.1 mc=data/math,data/code")
    assert entries == [
        MixtureEntry("ja", 0.644, ("data/ja",)),
        MixtureEntry("en", 0.256, ("data/en",)),
        MixtureEntry("mc", 0.1, ("data/math", "data/code")),
    ]
    assert parse_mixture([(2, "a/x"), ("y", 6, ["b", "c"])]) == [
        MixtureEntry("x", 0.25, ("a/x",)),
        MixtureEntry("y", 0.75, ("b", "c")),
    ]
    assert parse_mixture("data/only") == [MixtureEntry("only", 1.0, ("data/only",))]
    assert parse_mixture(entries) is entries  # a parsed mixture is not parsed again
    assert parse_mixture(list(entries)) == entries and parse_mixture(list(entries)) is not entries
    for bad, msg in [
        ("0.5 a 0.5", "pairs"),
        ("x a", "not a number"),
        ("0 a 1 b", "must be positive"),
        ("1 a 1 a", "twice"),
    ]:
        with pytest.raises(UserError, match=msg):
            parse_mixture(bad)


def test_block_pattern_meets_quotas_and_spreads_them():
    quota, pattern, rank = block_pattern([0.644, 0.256, 0.1], 1000)
    assert quota.tolist() == [644, 256, 100]
    assert np.bincount(pattern).tolist() == [644, 256, 100]
    for c in range(3):  # every prefix of the block stays within one sample of its share
        counts = np.cumsum(pattern == c)
        assert np.all(np.abs(counts - quota[c] * np.arange(1, 1001) / 1000) <= 1)
        assert rank[pattern == c].tolist() == list(range(quota[c]))


def _cjk_share(tokenizer, ids):
    text = tokenizer.decode([int(t) for t in ids])
    return sum("\u3040" <= ch <= "\u9fff" for ch in text) / max(1, len(text))


def test_realised_shares_match_weights_on_the_shared_corpus(swallow_mixture, tokenizer):
    ds = MixtureDataset(swallow_mixture, seq_len=2048, seed=7)
    tokens = np.zeros(3)
    for i in range(1000):
        s = ds[i]
        assert s["tokens"].shape == (2049,) and s["tokens"].dtype == np.int64
        tokens[s["corpus"]] += s["tokens"].size - 1
        if i % 50 == 0:  # the label is the content: Japanese samples are Japanese text
            japanese = _cjk_share(tokenizer, s["tokens"][:300]) > 0.3
            assert japanese == (ds.corpora[s["corpus"]].name == "ja"), i
    shares = tokens / tokens.sum()
    for share, weight in zip(shares, SWALLOW_MX.values(), strict=True):
        assert abs(share - weight) < 0.01
    rows = ds.report(1000)
    assert [r["samples"] for r in rows] == [644, 256, 100]


def test_order_is_a_pure_function_of_seed_and_mixture(swallow_mixture):
    a = MixtureDataset(swallow_mixture, seq_len=512, seed=1)
    b = MixtureDataset(swallow_mixture, seq_len=512, seed=1)
    c = MixtureDataset(swallow_mixture, seq_len=512, seed=2)
    idx = [0, 1, 17, 999, 12345]
    for i in reversed(idx):  # any access order gives the same samples
        assert np.array_equal(a[i]["tokens"], b[i]["tokens"])
    assert not all(np.array_equal(a[i]["tokens"], c[i]["tokens"]) for i in idx)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_a_full_pass_sees_every_training_token_once(shards):
    """Over one epoch of each corpus, the packed windows tile its training documents: no token is served
    twice, and only the tail of fewer than seq_len tokens is left for the next epoch."""
    seq_len = 512
    ds = MixtureDataset(
        f"0.5 ja={shards['ja']} 0.3 en={shards['en']} 0.2 code={shards['code']}", seq_len, seed=3
    )
    per_epoch = ds.samples_per_epoch
    vocab = 32000
    seen = np.zeros((3, vocab), dtype=np.int64)
    taken = np.zeros(3, dtype=np.int64)
    i = 0
    while np.any(taken < per_epoch):
        c, k = ds.locate(i)
        if k < per_epoch[c]:
            seen[c] += np.bincount(
                ds[i]["tokens"][:-1], minlength=vocab
            )  # the last token starts the next sample
            taken[c] += 1
        i += 1
    for c, corpus in enumerate(ds.corpora):
        data = np.zeros(vocab, dtype=np.int64)
        for d in corpus.train_docs:
            shard = corpus.shards[corpus.doc_shard[d]]
            start = corpus.doc_offset[d]
            data += np.bincount(shard.tokens[start : start + corpus.doc_length[d]], minlength=vocab)
        assert np.all(seen[c] <= data), corpus.name  # nothing twice
        assert seen[c].sum() == per_epoch[c] * seq_len
        assert 0 < data.sum() - seen[c].sum() <= seq_len  # only the tail is left out


def test_document_boundaries_follow_eos(swallow_mixture, tokenizer):
    ds = MixtureDataset(swallow_mixture, seq_len=1024, seed=0)
    for i in range(0, 300, 7):
        s = ds[i]
        tokens, pos = s["tokens"], s["position_ids"]
        assert pos.dtype == np.int64 and pos.shape == (1024,)
        starts = np.concatenate([[0], np.flatnonzero(tokens[:1023] == tokenizer.eos_id) + 1])
        assert np.flatnonzero(pos == 0).tolist() == starts.tolist()  # positions restart after each EOS
        bounds = [*starts.tolist(), 1024]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            assert pos[a:b].tolist() == list(range(b - a))


def test_exhaustion_starts_a_logged_counted_epoch_or_fails(shards, caplog):
    mixture = f"0.9 ja={shards['ja']} 0.1 code={shards['code']}"
    ds = MixtureDataset(mixture, seq_len=2048, seed=0)
    n = len(ds)
    c, k = ds.locate(n)
    assert k == ds.samples_per_epoch[c]  # sample n is the first repeat
    with caplog.at_level(logging.WARNING, logger="moecpt.data.mixture"):
        ds[n - 1]
        assert not caplog.records
        ds[n]
        ds[n + 1]
    assert len(caplog.records) == 1 and "starts epoch 2" in caplog.text and f"sample {n}" in caplog.text
    assert ds.epochs_used(n)["ja"] == 1.0 and ds.epochs_used(n + 1)["ja"] > 1.0

    strict = MixtureDataset(mixture, seq_len=2048, seed=0, allow_repeat=False)
    strict[n - 1]
    with pytest.raises(DataExhaustedError, match="corpus 'ja' is exhausted at global sample"):
        strict[n]


def test_repeated_epoch_is_reshuffled(shards):
    ds = MixtureDataset(f"1 ja={shards['ja']}", seq_len=2048, seed=0)
    n = int(ds.samples_per_epoch[0])
    first = {ds[i]["tokens"][:64].tobytes() for i in range(n)}
    second = [ds[n + i]["tokens"][:64].tobytes() for i in range(20)]
    assert sum(s in first for s in second) < 5  # new windows, not a replay of epoch 1


def test_validation_documents_never_reach_training(shards):
    ds = MixtureDataset(
        f"0.7 ja={shards['ja']} 0.3 en={shards['en']}", seq_len=256, seed=0, valid_fraction=0.05
    )
    for c, corpus in enumerate(ds.corpora):
        assert len(corpus.valid_docs) == round(0.05 * corpus.doc_length.size)
        assert not set(corpus.valid_docs) & set(corpus.train_docs)
        val = ds.validation_dataset(corpus.name)
        assert len(val) > 0 and val[0]["corpus"] == c
        # the validation tokens are the held-out documents, in order
        first = corpus.valid_docs[0]
        shard = corpus.shards[corpus.doc_shard[first]]
        doc = shard.tokens[corpus.doc_offset[first] : corpus.doc_offset[first] + corpus.doc_length[first]]
        n = min(len(doc), 257)
        assert val[0]["tokens"][:n].tolist() == doc[:n].tolist()
    # the split depends on the data, not on the training seed
    other = MixtureDataset(
        f"0.7 ja={shards['ja']} 0.3 en={shards['en']}", seq_len=512, seed=9, valid_fraction=0.05
    )
    assert np.array_equal(other.corpora[0].valid_docs, ds.corpora[0].valid_docs)


def test_too_little_data_for_one_sample(shards):
    with pytest.raises(UserError, match="fewer than one sample"):
        MixtureDataset(f"1 ja={shards['ja']}", seq_len=10_000_000)


def test_cli_mix_report(swallow_mixture, capsys):
    assert main(["data", "mix-report", "--mixture", swallow_mixture, "--samples", "1000"]) == 0
    out = capsys.readouterr().out
    assert "ja                64.40%    64.40%      644" in out
    assert "code              10.00%    10.00%      100" in out
    assert main(["data", "mix-report", "--mixture", swallow_mixture, "--samples", "1000", "--no-repeat"]) == 2
    assert "is exhausted" in capsys.readouterr().err


def test_jsonl_sources_are_tokenized_into_the_cache_on_first_use(data_dir, tmp_path):
    from moecpt.data.mixture import resolve_mixture, shared_corpus_mixture

    spec = shared_corpus_mixture(data_dir)
    assert [(e.name, e.weight) for e in spec] == list(SWALLOW_MX.items())
    with pytest.raises(UserError, match=r"mixture entry 'ja': .*corpus/ja is not a shard .*--cache-dir"):
        resolve_mixture(spec, cache_dir=None)
    small = [
        ("ja", 0.6, [str(corpus_file("ja/aozora_neko.jsonl"))]),
        ("en", 0.4, [str(corpus_file("en/ud_ewt.jsonl"))]),
    ]
    entries = resolve_mixture(small, tmp_path / "cache")
    assert all(
        Path(f"{p}.idx").is_file() and Path(p).parent == tmp_path / "cache"
        for e in entries
        for p in e.prefixes
    )
    assert resolve_mixture(small, tmp_path / "cache") == entries  # second use: the cached shards
    ds = MixtureDataset(entries, seq_len=128)
    assert ds.entries is entries  # resolve_mixture's result is used as it is, not parsed again
    assert ds.report(100)[0]["samples"] == 60
    # corpus names in the mixture stand for the sources listed under them (a training config's data.corpora)
    named = resolve_mixture("0.6 ja 0.4 en", tmp_path / "cache", sources={n: s for n, _, s in small})
    assert named == entries


def test_shards_of_different_tokenizers_do_not_mix(shards, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({"[UNK]": 0, "</s>": 1, "a": 2}, unk_token="[UNK]")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.jsonl").write_text('{"text": "' + "a " * 3000 + '"}\n')
    tokenize_corpus(
        [tmp_path / "a.jsonl"], tmp_path / "other", tokenizer=tmp_path / "tokenizer.json", progress=False
    )
    with pytest.raises(UserError, match="tokenized with different tokenizers"):
        MixtureDataset(f"0.5 ja={shards['ja']} 0.5 x={tmp_path / 'other'}", seq_len=128)
