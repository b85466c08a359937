"""BOS in evaluation and export: a document or prompt starts with BOS exactly when the tokenizer adds one
(`Tokenizer.add_bos`), not whenever it names one; an exported DeepSeek-V3 tokenizer gives transformers the
ids moecpt trained with, BOS included."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from moecpt.data.tokenizer import load_tokenizer
from moecpt.eval.heldout import document_windows
from moecpt.eval.lm import ModelLM
from moecpt.train.export import export_tokenizer

DEEPSEEK = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "tokenizers" / "deepseek-v3"
TEXTS = ["吾輩は猫である。名前はまだ無い。", "The quick brown fox jumps over the lazy dog."]


@pytest.fixture(scope="module")
def adds():
    """DeepSeek-V3's tokenizer: tokenizer_config.json says add_bos_token true (the post-processor does not)."""
    return load_tokenizer(DEEPSEEK)


@pytest.fixture(scope="module")
def names_only(tmp_path_factory):
    """The same vocabulary with add_bos_token false: BOS named (bos_token), never added, like gpt-oss's
    <|startoftext|>."""
    d = tmp_path_factory.mktemp("names-bos")
    shutil.copyfile(DEEPSEEK / "tokenizer.json", d / "tokenizer.json")
    cfg = json.loads((DEEPSEEK / "tokenizer_config.json").read_text(encoding="utf-8"))
    (d / "tokenizer_config.json").write_text(json.dumps(cfg | {"add_bos_token": False}), encoding="utf-8")
    return load_tokenizer(d)


def lm_of(tokenizer) -> ModelLM:
    return ModelLM(SimpleNamespace(config=SimpleNamespace(max_position_embeddings=256)), tokenizer, max_length=256)


def test_a_named_but_not_added_bos_is_left_out(names_only):
    assert names_only.bos_id == 0 and not names_only.add_bos
    windows, n_tokens, n_bytes = document_windows(names_only, TEXTS, max_length=4096)
    assert windows == [names_only.encode(t) for t in TEXTS] and windows[0][0] != 0
    # no context for the first token: neither it nor its bytes count
    assert n_tokens == sum(len(w) - 1 for w in windows)
    assert n_bytes == sum(len(t.encode()) - names_only.byte_length(w[:1]) for t, w in zip(TEXTS, windows, strict=True))
    assert lm_of(names_only).encode_prompt(TEXTS[0], 8, bos=True) == names_only.encode(TEXTS[0])


def test_an_added_bos_starts_documents_and_prompts(adds):
    assert adds.bos_id == 0 and adds.add_bos
    windows, n_tokens, n_bytes = document_windows(adds, TEXTS, max_length=4096)
    assert windows == [[0, *adds.encode(t)] for t in TEXTS]
    assert n_tokens == sum(len(adds.encode(t)) for t in TEXTS) and n_bytes == sum(len(t.encode()) for t in TEXTS)
    lm = lm_of(adds)
    assert lm.encode_prompt(TEXTS[0], 8, bos=True) == [0, *adds.encode(TEXTS[0])]
    assert lm.encode_prompt(TEXTS[0], 8, bos=False) == adds.encode(TEXTS[0])  # a task that asks for none


def test_exported_deepseek_tokenizer_gives_transformers_moecpts_ids(adds, names_only, tmp_path):
    transformers = pytest.importorskip("transformers")
    for tok, bos in ((adds, [0]), (names_only, [])):
        out = tmp_path / str(len(bos))
        out.mkdir()
        export_tokenizer(tok.path, out, max_length=4096)
        hf = transformers.AutoTokenizer.from_pretrained(out)
        for text in TEXTS:
            assert hf(text)["input_ids"] == bos + tok.encode(text)
