"""Evaluation, held-out bits per byte, validation byte counts and export with the real byte-level BPE
tokenizers that have no BOS (Qwen3, OLMoE), on a tiny random model with Qwen3's 151,936 embedding rows.

The tokenizer files are read from ../shared/data/tokenizers (skipped without it)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from ..corpora import SHARED_DATA, corpus_file

torch = pytest.importorskip("torch")

TOKENIZERS = SHARED_DATA / "tokenizers"
QWEN3_ROWS = 151936  # Qwen3's config vocab_size, for 151,669 token ids


def real_tokenizer_dir(name: str) -> Path:
    path = TOKENIZERS / name
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"the real {name} tokenizer is not at {path}")
    return path


def first_texts(rel: str, n: int, max_chars: int | None = None) -> list[str]:
    out = []
    with corpus_file(rel).open(encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line)["text"][:max_chars])
            if len(out) == n:
                break
    return out


@pytest.fixture(scope="module")
def qwen3():
    from moecpt.data.tokenizer import load_tokenizer

    return load_tokenizer(real_tokenizer_dir("qwen3"))


@pytest.fixture(scope="module")
def tiny_qwen_vocab_model():
    from moecpt.model import build_model
    from moecpt.model.config import MixtralConfig

    return build_model(MixtralConfig.from_preset("tiny", vocab_size=QWEN3_ROWS), "cpu", seed=0).eval()


def test_heldout_without_bos_leaves_out_the_first_token_and_its_bytes(qwen3):
    from moecpt.eval.heldout import document_windows

    texts = first_texts("ja/wikipedia_dev.jsonl", 3) + ["猫", "a"]
    pieces, n_tokens, n_bytes = document_windows(qwen3, texts, max_length=4096)
    ids = [qwen3.encode(t) for t in texts]
    assert n_tokens == sum(len(i) - 1 for i in ids)
    assert n_bytes == sum(len(t.encode("utf-8")) - qwen3.byte_length(i[:1]) for t, i in zip(texts, ids, strict=True))
    assert n_bytes == sum(qwen3.byte_length(i[1:]) for i in ids)  # the bytes of exactly the predicted tokens
    assert pieces == [i for i in ids if len(i) > 1]  # no BOS, nothing in front; one-token documents predict none


def test_heldout_with_bos_is_unchanged():
    pytest.importorskip("mistral_common", reason="the default Mixtral tokenizer ships in mistral-common")
    from moecpt.data.tokenizer import load_tokenizer
    from moecpt.eval.heldout import document_windows

    tok = load_tokenizer()
    texts = first_texts("ja/wikipedia_dev.jsonl", 3)
    pieces, n_tokens, n_bytes = document_windows(tok, texts, max_length=4096)
    assert pieces == [[tok.bos_id] + tok.encode(t) for t in texts]
    assert n_tokens == sum(len(tok.encode(t)) for t in texts)
    assert n_bytes == sum(len(t.encode("utf-8")) for t in texts)


def test_heldout_bits_per_byte_matches_a_direct_computation(qwen3, tiny_qwen_vocab_model):
    """Summed cross-entropy of every token but each document's first, over the bytes of those tokens; long
    documents in windows of 24 tokens overlapping by one."""
    from moecpt.eval.heldout import heldout_bits_per_byte, windows

    model = tiny_qwen_vocab_model
    texts = first_texts("ja/wikipedia_dev.jsonl", 2, max_chars=80) + first_texts("en/wikitext2_valid.jsonl", 2, 200)
    got = heldout_bits_per_byte(model, qwen3, texts, max_length=24, batch_size=3)
    nats, n_bytes = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = qwen3.encode(text)
            n_bytes += qwen3.byte_length(ids[1:])
            for w in windows(ids, 24):
                logits = model(torch.tensor([w])).logits[0, :-1].double()
                nats += float(torch.nn.functional.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum"))
    assert got["bytes"] == n_bytes
    assert got["tokens"] == sum(len(qwen3.encode(t)) - 1 for t in texts)
    assert got["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)


def test_validation_counts_the_bytes_of_the_predicted_text(qwen3):
    """A packed validation window predicts all its tokens but the first; EOS counts zero bytes (its literal
    text "<|endoftext|>" is not part of the corpus), and a window may start inside a character."""
    from moecpt.train.validate import Validator

    a, b = "吾輩は猫である。", " The cat sat."
    first = qwen3.encode(a)
    window = np.array(first + [qwen3.eos_id] + qwen3.encode(b))
    v = Validator(None, qwen3, None, micro_batch=1, windows=1, seq_len=len(window) - 1, intra_doc=False)
    expected = len(a.encode("utf-8")) - qwen3.byte_length(first[:1]) + len(b.encode("utf-8"))
    assert v.window_bytes(0, 0, window) == expected
    assert v.window_bytes(0, 1, window[2:]) == expected - qwen3.byte_length(first[1:3])


@pytest.mark.parametrize("name", ["qwen3", "olmoe"])
def test_exported_tokenizer_round_trips_through_transformers(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    from moecpt.data.tokenizer import load_tokenizer
    from moecpt.train.export import export_tokenizer

    src = real_tokenizer_dir(name)
    written = export_tokenizer(src / "tokenizer.json", tmp_path, 4096)
    for f in written:  # the publisher's files are copied as they are
        if (src / f).is_file():
            assert (tmp_path / f).read_bytes() == (src / f).read_bytes()
    ours = load_tokenizer(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (ours.vocab_size, ours.bos_id, ours.eos_id) == (load_tokenizer(src).vocab_size, None,
                                                           load_tokenizer(src).eos_id)
    texts = (first_texts("ja/wikipedia_dev.jsonl", 3, 400) + first_texts("en/wikitext2_valid.jsonl", 3, 400)
             + ["吾輩は猫である。<|endoftext|>名前はまだ無い。\n\n    def f(x):\treturn x"])
    for text in texts:
        assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
        assert theirs(text)["input_ids"] == ours.encode(text)  # no BOS added by transformers either
    assert theirs.bos_token_id is None


@pytest.fixture(scope="module")
def qwen_model_dir(qwen3, tiny_qwen_vocab_model, tmp_path_factory) -> Path:
    """The tiny model exported with the Qwen3 tokenizer (what a run with data.tokenizer = that file exports)."""
    from moecpt.train.export import export_hf

    return export_hf(tiny_qwen_vocab_model, qwen3.path, tmp_path_factory.mktemp("qwen") / "hf")


def test_eval_picks_the_model_directorys_tokenizer_json_and_adds_no_bos(qwen3, tiny_qwen_vocab_model,
                                                                        qwen_model_dir):
    from moecpt.eval.lm import ModelLM, load_eval_tokenizer

    tok = load_eval_tokenizer(qwen_model_dir)
    assert tok.path == str(qwen_model_dir / "tokenizer.json") and tok.fingerprint == qwen3.fingerprint
    lm = ModelLM(tiny_qwen_vocab_model, tok, max_length=64)
    assert lm.encode_prompt("問題：", 8, bos=True) == qwen3.encode("問題：")
    assert qwen3.eos_id in lm.stop_ids(("\n",))


def test_moecpt_eval_runs_with_the_qwen3_tokenizer(qwen_model_dir, eval_data, tmp_path):
    from moecpt.eval.runner import evaluate_model

    heldout = tmp_path / "ja.jsonl"
    heldout.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                               for t in first_texts("ja/wikipedia_dev.jsonl", 2, 100)), encoding="utf-8")
    res = evaluate_model(qwen_model_dir, tmp_path / "o", data_dir=eval_data, tasks="jcom", limit=2,
                         heldout=f"ja={heldout}", progress=False, max_length=256)
    assert res["tasks"]["jcom"]["n"] == 2
    assert res["heldout"]["ja"]["bits_per_byte"] > 0 and res["heldout"]["ja"]["docs"] == 2
