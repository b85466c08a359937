"""The tokenizer interface other layers use: the default Mixtral tokenizer, SentencePiece and tokenizer.json."""

from __future__ import annotations

import json
import shutil

import pytest

from moecpt.data.tokenizer import load_tokenizer
from moecpt.errors import UserError

from ..corpora import corpus_files

MIXTRAL_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"


def test_default_is_the_mixtral_tokenizer(tokenizer):
    assert tokenizer.vocab_size == 32000
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, None)
    assert tokenizer.fingerprint == MIXTRAL_SHA256
    assert tokenizer.path.endswith("mistral_common/data/tokenizer.model.v1")


def test_encode_adds_no_special_tokens_and_decodes_back(tokenizer):
    text = "吾輩は猫である。名前はまだ無い。 The cat has no name."
    ids = tokenizer.encode(text)
    assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode_batch([text, "x = 1\n"]) == [ids, tokenizer.encode("x = 1\n")]


def test_round_trip_on_every_shared_corpus_file(tokenizer):
    for path in corpus_files():
        texts = [json.loads(line)["text"] for line in path.open(encoding="utf-8")][:50]
        for text, ids in zip(texts, tokenizer.encode_batch(texts), strict=True):
            assert tokenizer.decode(ids) == text, path


def test_directory_prefers_tokenizer_model(tokenizer, tmp_path):
    shutil.copy(tokenizer.path, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer.json").write_text("not read")
    tok = load_tokenizer(tmp_path)
    assert tok.path == str(tmp_path / "tokenizer.model")
    assert tok.fingerprint == tokenizer.fingerprint


def _train_bpe(path, texts, specials=("<s>", "</s>")):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(specials),
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))


def test_hugging_face_tokenizer_json(tmp_path):
    texts = ["The quick brown fox jumps over the lazy dog.", "吾輩は猫である。"] * 20
    _train_bpe(tmp_path / "tokenizer.json", texts)
    tok = load_tokenizer(tmp_path)  # directory with only tokenizer.json
    assert tok.eos_id == 1 and tok.bos_id == 0
    ids = tok.encode(texts[1])
    assert tok.eos_id not in ids and tok.decode(ids) == texts[1]
    assert len(tok.fingerprint) == 64


def test_tokenizer_config_names_the_eos_token(tmp_path):
    _train_bpe(tmp_path / "tokenizer.json", ["hello world"] * 10, specials=("<|begin|>", "<|im_end|>"))
    with pytest.raises(UserError, match="no end-of-sequence token"):
        load_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    assert load_tokenizer(tmp_path / "tokenizer.json").eos_id == 1


def test_missing_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "nope.model")
    with pytest.raises(UserError, match="neither tokenizer.model nor tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "bad.model").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable SentencePiece model"):
        load_tokenizer(tmp_path / "bad.model")


def test_data_package_does_not_import_torch():
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("mistral_common") is None:
        pytest.skip("the default tokenizer needs mistral-common")

    code = (
        "import sys, moecpt.data.cli; from moecpt.data import MixtureLoader, load_tokenizer, tokenize_corpus; "
        "load_tokenizer(); print(sorted(m for m in ('torch', 'transformers', 'mistral_common') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
