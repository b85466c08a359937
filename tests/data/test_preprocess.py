"""`moecpt data tokenize`: text -> shard round trips on the shared corpora, and every bad input's error."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from moecpt.cli import main
from moecpt.data import preprocess
from moecpt.data.indexed import IndexedShard, file_sha256, shard_exists
from moecpt.data.preprocess import cached_shard, tokenize_corpus
from moecpt.errors import UserError

from ..corpora import corpus_file
from .conftest import DATA, require_data


def _jsonl(path, records, encoding="utf-8"):
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode(encoding))
    return path


@pytest.mark.parametrize(
    "name",
    [
        "ja/aozora_neko",
        "ja/wikipedia_dev",
        "en/wikitext2_valid",
        "code/thealgorithms_python",
        "math/gsm8k_train",
    ],
)
def test_round_trip_text_shard_tokens_text(tokenizer, tmp_path, name):
    src = corpus_file(f"{name}.jsonl")
    texts = [json.loads(line)["text"] for line in src.open(encoding="utf-8")]
    report = tokenize_corpus([src], tmp_path / "s", progress=False)
    shard = IndexedShard(tmp_path / "s")
    assert shard.num_documents == report.num_documents == len(texts)
    assert shard.num_tokens == report.num_tokens
    for i in range(0, len(texts), max(1, len(texts) // 200)):
        ids = shard.document(i).tolist()
        assert ids[-1] == tokenizer.eos_id and tokenizer.bos_id not in ids
        assert ids[:-1] == tokenizer.encode(texts[i])
        assert tokenizer.decode(ids[:-1]) == texts[i]


def test_sidecar_records_tokenizer_sources_and_counts(tokenizer, tmp_path):
    srcs = [corpus_file("en/wikipedia_ai.jsonl", docs=1), corpus_file("ja/wikipedia_ai.jsonl", docs=1)]
    tokenize_corpus(srcs, tmp_path / "s", progress=False)
    meta = json.loads((tmp_path / "s.meta.json").read_text())
    assert meta["tokenizer"]["sha256"] == tokenizer.fingerprint
    assert meta["tokenizer"]["vocab_size"] == 32000 and meta["dtype"] == "uint16"
    assert [s["sha256"] for s in meta["sources"]] == [file_sha256(s) for s in srcs]
    assert [s["documents"] for s in meta["sources"]] == [1, 1]
    assert meta["num_documents"] == 2 and meta["bin_sha256"] == file_sha256(tmp_path / "s.bin")


def test_workers_and_compression_do_not_change_the_shard(tmp_path):
    src = corpus_file("ja/aozora_neko.jsonl")
    tokenize_corpus([src], tmp_path / "one", progress=False)
    gz = tmp_path / "neko.jsonl.gz"
    gz.write_bytes(gzip.compress(src.read_bytes()))
    tokenize_corpus([gz], tmp_path / "two", workers=2, progress=False)
    assert (tmp_path / "one.bin").read_bytes() == (tmp_path / "two.bin").read_bytes()
    assert (tmp_path / "one.idx").read_bytes() == (tmp_path / "two.idx").read_bytes()
    zstandard = pytest.importorskip("zstandard")
    zst = tmp_path / "neko.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(src.read_bytes()))
    tokenize_corpus([zst], tmp_path / "three", progress=False)
    assert (tmp_path / "one.bin").read_bytes() == (tmp_path / "three.bin").read_bytes()


def test_bos_and_eos_options(tokenizer, tmp_path):
    src = _jsonl(tmp_path / "a.jsonl", [{"text": "hello"}, {"text": "world"}])
    tokenize_corpus([src], tmp_path / "s", append_bos=True, append_eos=False, progress=False)
    shard = IndexedShard(tmp_path / "s")
    assert shard.document(1).tolist() == [tokenizer.bos_id, *tokenizer.encode("world")]


def test_large_vocabulary_uses_int32(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(70000)} | {"[UNK]": 70000, "</s>": 70001}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    src = _jsonl(tmp_path / "a.jsonl", [{"text": "w5 w69999 w65536"}])
    tokenize_corpus([src], tmp_path / "s", tokenizer=tmp_path / "tokenizer.json", progress=False)
    shard = IndexedShard(tmp_path / "s")
    assert shard.dtype == np.int32
    assert shard.document(0).tolist() == [5, 69999, 65536, 70001]


def test_invalid_json_names_file_and_line_or_is_skipped_and_counted(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "one"}\n{"text": "two"\n{"text": "three"}\n')
    with pytest.raises(UserError, match=r"a\.jsonl:2: invalid JSON .*--skip-invalid-json"):
        tokenize_corpus([src], tmp_path / "s", progress=False)
    assert not shard_exists(tmp_path / "s")
    report = tokenize_corpus([src], tmp_path / "s", skip_invalid_json=True, progress=False)
    assert report.num_documents == 2 and report.invalid_json_lines == 1
    assert report.invalid_json_examples[0].endswith("a.jsonl:2: Expecting ',' delimiter")
    assert json.loads((tmp_path / "s.meta.json").read_text())["skipped"]["invalid_json_lines"] == 1


def test_missing_or_non_string_text_field(tmp_path):
    src = _jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, {"body": "x", "id": 3}])
    with pytest.raises(
        UserError, match=r"a\.jsonl:2: no key 'text' in the record \(it has: 'body', 'id'\); .*--text-key"
    ):
        tokenize_corpus([src], tmp_path / "s", progress=False)
    _jsonl(src, [{"body": "ok"}, {"body": "x", "id": 3}])
    assert tokenize_corpus([src], tmp_path / "s", text_key="body", progress=False).num_documents == 2
    src = _jsonl(tmp_path / "b.jsonl", [{"text": ["a list"]}])
    with pytest.raises(UserError, match=r"b\.jsonl:1: key 'text' holds a list"):
        tokenize_corpus([src], tmp_path / "s2", progress=False)


def test_shift_jis_input_names_offset_and_the_encoding_flag(tmp_path):
    require_data()
    raw = DATA / "raw/aozora_sjis/rashomon.txt"
    data = raw.read_bytes()
    first_bad = next(i for i in range(len(data)) if data[i] >= 0x80)
    with pytest.raises(UserError) as e:
        tokenize_corpus([raw], tmp_path / "s", progress=False)
    msg = str(e.value)
    assert str(raw) in msg and f"byte offset {first_bad}" in msg and "--encoding cp932" in msg
    report = tokenize_corpus([raw], tmp_path / "s", encoding="cp932", progress=False)
    assert report.num_documents == 1
    assert "羅生門" in data.decode("cp932")

    # the same text as JSON Lines: the offset counts bytes from the start of the file
    lines = [{"text": "plain ascii"}, {"text": data.decode("cp932")[:200]}]
    src = _jsonl(tmp_path / "sjis.jsonl", lines, encoding="cp932")
    offset = len(json.dumps(lines[0]).encode()) + 1
    offset += next(
        i for i, b in enumerate(json.dumps(lines[1], ensure_ascii=False).encode("cp932")) if b >= 0x80
    )
    with pytest.raises(UserError, match=rf"sjis\.jsonl:2: cannot decode byte offset {offset} as utf-8"):
        tokenize_corpus([src], tmp_path / "s", progress=False)
    assert tokenize_corpus([src], tmp_path / "s", encoding="cp932", progress=False).num_documents == 2


def test_empty_documents_and_blank_lines_are_skipped_and_counted(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "one"}\n{"text": ""}\n\n{"text": "  \\n "}\n{"text": "two"}\n')
    report = tokenize_corpus([src], tmp_path / "s", progress=False)
    assert (report.num_documents, report.empty_documents, report.blank_lines) == (2, 2, 1)
    assert IndexedShard(tmp_path / "s").num_documents == 2


def test_missing_inputs(tmp_path):
    with pytest.raises(UserError, match=r"nope\.jsonl: input file not found"):
        tokenize_corpus([tmp_path / "nope.jsonl"], tmp_path / "s", progress=False)
    with pytest.raises(UserError, match=r"\*\.jsonl: no input file matches this pattern"):
        tokenize_corpus([str(tmp_path / "*.jsonl")], tmp_path / "s", progress=False)
    with pytest.raises(UserError, match="no non-empty documents"):
        tokenize_corpus([_jsonl(tmp_path / "e.jsonl", [{"text": ""}])], tmp_path / "s", progress=False)
    assert not shard_exists(tmp_path / "s")


def test_interrupted_run_leaves_no_shard(tmp_path, monkeypatch):
    src = _jsonl(tmp_path / "a.jsonl", [{"text": f"document {i} " * 50} for i in range(2000)])
    calls = []

    def encode_then_die(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    real = preprocess.encode_documents
    monkeypatch.setattr(preprocess, "_CHUNK_BYTES", 10_000)
    monkeypatch.setattr(preprocess, "encode_documents", encode_then_die)
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus([src], tmp_path / "out" / "s", progress=False)
    assert list((tmp_path / "out").iterdir()) == []


def test_cached_shard_tokenizes_once_and_follows_content(tmp_path):
    src = _jsonl(tmp_path / "a.jsonl", [{"text": "first version"}])
    p1 = cached_shard([src], tmp_path / "cache")
    mtime = (p1.parent / f"{p1.name}.bin").stat().st_mtime_ns
    assert cached_shard([src], tmp_path / "cache") == p1
    assert (p1.parent / f"{p1.name}.bin").stat().st_mtime_ns == mtime
    _jsonl(src, [{"text": "second version"}])
    p2 = cached_shard([src], tmp_path / "cache")
    assert p2 != p1
    assert IndexedShard(p2).document(0).tolist() != IndexedShard(p1).document(0).tolist()


def test_cli_tokenize_and_errors(tmp_path, capsys):
    src = _jsonl(tmp_path / "a.jsonl", [{"content": "hello"}])
    assert main(["data", "tokenize", str(src), "--output", str(tmp_path / "s"), "--text-key", "content"]) == 0
    assert "1 documents" in capsys.readouterr().out
    assert main(["data", "tokenize", str(src), "--output", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moecpt data: error: ") and "a.jsonl:1: no key 'text'" in err
    assert main(["data", "inspect", str(tmp_path / "s")]) == 0
    assert "hello" in capsys.readouterr().out
