"""Vocabulary expansion, the tokenizer side (`moecpt.data.vocab.extend_tokenizer`).

The numbers of the issue, measured here on the real data: 16,000 pieces learned on ../shared/data/corpus/ja and
appended to the real Mixtral tokenizer cut its tokens per character on held-out Japanese text (our own
sentences, tests/data/fixtures/heldout_ja.txt, which the corpus does not contain) by at least 40% and change
English by less than 2%. Then what a user relies on: every old id keeps its piece and score, new ids come after
the old ones and are produced by the encoder, byte fallback still works, the directory loads like any other
tokenizer, and a tokenizer.json (byte-level BPE) base is extended by merges that keep its special tokens' ids.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from pathlib import Path

import pytest

from moecpt.data.tokenizer import load_tokenizer
from moecpt.data.vocab import (
    EXTENSION_FILE,
    base_tokenizations,
    corpus_texts,
    extend_tokenizer,
    learn_merges,
    training_lines,
)
from moecpt.errors import UserError
from moecpt.tools.vocab import vocab_report

from ..corpora import SHARED_DATA

FIXTURES = Path(__file__).parent / "fixtures"
JA_CORPUS = SHARED_DATA / "corpus" / "ja"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def heldout(lang: str) -> list[str]:
    return [(FIXTURES / f"heldout_{lang}.txt").read_text(encoding="utf-8")]


def sp_proto(path: Path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto


@pytest.fixture(scope="module")
def mixtral_16k(tmp_path_factory, shared_data) -> Path:
    """The issue's measured run: the Mixtral tokenizer + 16,000 pieces learned on the whole Japanese corpus."""
    return extend_tokenizer(None, [JA_CORPUS], 16000, tmp_path_factory.mktemp("mixtral-16k"))


def test_16k_japanese_pieces_cut_mixtral_tokens_per_character_by_40_percent_and_leave_english(mixtral_16k):
    report = vocab_report(None, mixtral_16k, heldout("ja"), heldout("en"))
    ja, en = report["ja"], report["en"]
    assert report["new"]["vocab_size"] - report["old"]["vocab_size"] <= 16000
    assert 1.05 < ja["old_tokens_per_character"] < 1.25  # Mixtral on Japanese prose (~1.13)
    assert ja["change"] <= -0.40, ja
    assert abs(en["change"]) < 0.02, en
    meta = json.loads((mixtral_16k / EXTENSION_FILE).read_text())
    assert meta["added"] == 16000 and meta["first_new_id"] == 32000 and meta["format"] == "sentencepiece"


def test_every_old_piece_keeps_its_id_and_score_and_new_pieces_follow_scored_below(mixtral_16k):
    base = sp_proto(Path(load_tokenizer(None).path))
    ext = sp_proto(mixtral_16k / "tokenizer.model")
    assert len(ext.pieces) == 48000
    assert [(p.piece, p.score, p.type) for p in ext.pieces[:32000]] == [(p.piece, p.score, p.type) for p in base.pieces]
    new = ext.pieces[32000:]
    assert len({p.piece for p in new}) == 16000 and not {p.piece for p in new} & {p.piece for p in base.pieces}
    learned = [p.score for p in base.pieces if p.type == 1 and p.score > -1e8]
    scores = [p.score for p in new]
    assert scores[0] < min(learned) and all(a > b for a, b in itertools.pairwise(scores))  # old merges first
    assert ext.normalizer_spec == base.normalizer_spec and ext.trainer_spec.byte_fallback


def test_new_pieces_are_what_the_encoder_produces_and_byte_fallback_still_works(mixtral_16k):
    tok = load_tokenizer(mixtral_16k)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (48000, 1, 2)
    text = heldout("ja")[0]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert sum(i >= 32000 for i in ids) > 0.4 * len(ids)  # the new pieces carry much of the text
    rare = "🦜𠮷"  # in neither vocabulary: UTF-8 bytes, and back
    pieces = tok.pieces(rare)
    assert pieces[1:] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x9C>", "<0xF0>", "<0xA0>", "<0xAE>", "<0xB7>"]
    assert tok.decode(tok.encode(rare)) == rare


def test_each_new_piece_encodes_to_its_own_id(mixtral_16k):
    """(Pieces the merges could not form from their own text were replaced by the next candidates.)"""
    import sentencepiece as spm

    proto = sp_proto(mixtral_16k / "tokenizer.model")
    proto.normalizer_spec.add_dummy_prefix = False
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    new = [p.piece for p in proto.pieces[32000:]]
    assert sp.encode([p.replace("▁", " ") for p in new]) == [[32000 + i] for i in range(len(new))]


# ---- a tokenizer.json base ----------------------------------------------------------------------------------
def byte_level_tokenizer(out_dir: Path, texts: list[str], size: int = 400) -> Path:
    """A small byte-level BPE tokenizer.json trained on `texts`, with special tokens after its vocabulary (as
    Qwen's: the tokenizers library numbers them after the model's ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=size, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(SPECIALS)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": None}))
    return out_dir


@pytest.fixture(scope="module")
def json_extension(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("bpe")
    base = byte_level_tokenizer(root / "base", heldout("en") * 3)
    out = extend_tokenizer(base, [JA_CORPUS / "wikipedia_dev.jsonl"], 300, root / "ext")
    return base, out


def test_tokenizer_json_extension_keeps_ids_and_special_tokens_and_appends_merges(json_extension):
    base, out = json_extension
    old, new = (json.loads((d / "tokenizer.json").read_text()) for d in (base, out))
    old_vocab, new_vocab = old["model"]["vocab"], new["model"]["vocab"]
    assert all(new_vocab[t] == i for t, i in old_vocab.items())
    assert new["model"]["merges"][:len(old["model"]["merges"])] == old["model"]["merges"]
    specials = {t["content"]: t["id"] for t in old["added_tokens"]}
    assert [load_tokenizer(d).encode("".join(SPECIALS)) for d in (base, out)] == [list(specials.values())] * 2
    added = sorted(i for t, i in new_vocab.items() if t not in old_vocab and t not in specials)
    first = max(specials.values()) + 1
    assert added == list(range(first, first + 300))
    tok_old, tok_new = load_tokenizer(base), load_tokenizer(out)
    assert (tok_new.vocab_size, tok_new.eos_id, tok_new.bos_id) == (first + 300, tok_old.eos_id, None)
    text = heldout("ja")[0]
    ids = tok_new.encode(text)
    assert tok_new.decode(ids) == text and tok_new.byte_length(ids) == len(text.encode())
    assert sum(i >= first for i in ids) > 0.3 * len(ids)
    report = vocab_report(tok_old, tok_new, heldout("ja"), heldout("en"))
    assert report["ja"]["change"] < -0.3 and abs(report["en"]["change"]) < 0.02


def test_tokenizer_json_new_pieces_split_into_old_tokens_that_spell_them(json_extension):
    base, out = json_extension
    old, new = load_tokenizer(base), load_tokenizer(out)
    pieces = base_tokenizations(out, old.vocab_size)
    assert len(pieces) == 300
    first = old.vocab_size
    for j, ids in enumerate(pieces):
        assert max(ids) < first and old.byte_length(ids) == new.byte_length([first + j])
        assert len(ids) >= 2  # a merge of two or more old tokens


def test_the_extended_real_qwen3_tokenizer_keeps_its_special_token_ids(tmp_path, shared_data):
    base = shared_data / "tokenizers" / "qwen3"
    out = extend_tokenizer(base, [JA_CORPUS / "wikipedia_dev.jsonl"], 200, tmp_path / "ext")
    old, new = load_tokenizer(base), load_tokenizer(out)
    assert (new.vocab_size, new.eos_id, new.pad_id) == (old.vocab_size + 200, old.eos_id, old.pad_id)
    text = "<|im_start|>user\n" + heldout("ja")[0][:400] + "<|im_end|>"
    ids = new.encode(text)
    assert ids[0] == old.encode("<|im_start|>")[0] and ids[-1] == old.encode("<|im_end|>")[0]
    assert new.decode(ids) == text and len(ids) < len(old.encode(text))
    assert not (out / "vocab.json").exists()  # the base's vocab.json would describe the old vocabulary
    assert (out / "tokenizer_config.json").read_bytes() == (base / "tokenizer_config.json").read_bytes()


# ---- the BPE learner and the corpus lines -------------------------------------------------------------------
def reference_merges(segmented: dict, count: int, vocab: dict, skip) -> list:
    """The textbook BPE loop (recount everything each step), which learn_merges must agree with."""
    words, merges, new = dict(segmented), [], 0
    while new < count:
        counts = Counter()
        for w, n in words.items():
            for p in itertools.pairwise(w):
                counts[p] += n
        candidates = [(-c, p) for p, c in counts.items() if c > 0 and not skip(p)]
        if not candidates:
            break
        pair = min(candidates)[1]
        merges.append(pair)
        new += pair[0] + pair[1] not in vocab
        merged = Counter()
        for w, n in words.items():
            out, k = [], 0
            while k < len(w):
                if k + 1 < len(w) and (w[k], w[k + 1]) == pair:
                    out.append(w[k] + w[k + 1])
                    k += 2
                else:
                    out.append(w[k])
                    k += 1
            merged[tuple(out)] += n
        words = merged
    return merges


def test_learn_merges_agrees_with_the_textbook_bpe_loop():
    for seed in range(200):
        r = random.Random(seed)
        segmented = Counter()
        for _ in range(r.randint(1, 25)):
            segmented[tuple(r.choice("aab") for _ in range(r.randint(1, 12)))] += r.randint(1, 5)
        vocab = {"aa": 0} if seed % 2 else {}
        skip = (lambda p: p == ("b", "a")) if seed % 3 == 0 else (lambda p: False)
        assert learn_merges(dict(segmented), 8, vocab, skip) == reference_merges(segmented, 8, vocab, skip), seed


def test_long_lines_are_cut_after_a_sentence_end_within_the_byte_limit():
    text = "あ" * 10 + "。" + "い" * 10 + "\n\n short line \n" + "う" * 30
    lines = list(training_lines([text], 40))
    assert lines == ["あ" * 10 + "。", "い" * 10, "short line", "う" * 13, "う" * 13, "う" * 4]
    assert all(len(s.encode()) <= 40 for s in lines)


# ---- refusals -----------------------------------------------------------------------------------------------
def test_bad_requests_are_refused_naming_the_problem(tmp_path, shared_data):
    corpus = JA_CORPUS / "wikipedia_dev.jsonl"
    with pytest.raises(UserError, match="--add must be a positive"):
        extend_tokenizer(None, [corpus], 0, tmp_path / "a")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no text key"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not a JSON object with a 'text'"):
        extend_tokenizer(None, [bad], 10, tmp_path / "b")
    with pytest.raises(UserError, match="no input file matches"):
        extend_tokenizer(None, [tmp_path / "none*.jsonl"], 10, tmp_path / "c")
    base = byte_level_tokenizer(tmp_path / "base", heldout("en"), size=300)
    with pytest.raises(UserError, match="is the base tokenizer's directory"):
        extend_tokenizer(base, [corpus], 10, base)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match="holds no text"):
        extend_tokenizer(None, [empty], 10, tmp_path / "d")


def test_corpora_are_read_from_jsonl_txt_and_compressed_files_and_other_encodings_refused(tmp_path, shared_data):
    import gzip

    import zstandard

    docs = ["一つ目の文書。", "二つ目の文書。"]
    lines = "".join(json.dumps({"text": d, "id": i}, ensure_ascii=False) + "\n" for i, d in enumerate(docs))
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    (tmp_path / "c.txt").write_text("テキスト\nファイル", encoding="utf-8")
    files = [tmp_path / n for n in ("a.jsonl.gz", "b.jsonl.zst", "c.txt")]
    assert list(corpus_texts(files)) == [*docs, *docs, "テキスト\nファイル"]
    sjis = sorted((shared_data / "raw" / "aozora_sjis").glob("*.txt"))[0]
    with pytest.raises(UserError, match=r"not UTF-8 text .* iconv -f cp932"):
        list(corpus_texts([sjis]))


def test_a_unigram_or_wordpiece_base_is_refused(tmp_path, shared_data):
    import io

    import sentencepiece as spm
    from tokenizers import Tokenizer, models

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(heldout("en")[0].splitlines()), model_writer=model,
                                   model_type="unigram", vocab_size=120, minloglevel=2,
                                   hard_vocab_limit=False)
    (tmp_path / "uni.model").write_bytes(model.getvalue())
    with pytest.raises(UserError, match="SentencePiece BPE models"):
        extend_tokenizer(tmp_path / "uni.model", [JA_CORPUS / "wikipedia_dev.jsonl"], 10, tmp_path / "u")
    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "</s>": 1, "a": 2}, unk_token="[UNK]"))
    wp.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match="handles BPE tokenizer.json files; this model is 'WordPiece'"):
        extend_tokenizer(tmp_path / "tokenizer.json", [JA_CORPUS / "wikipedia_dev.jsonl"], 10, tmp_path / "w")
