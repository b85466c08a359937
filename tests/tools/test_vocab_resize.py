"""Vocabulary expansion, the model side (`moecpt.tools.vocab.resize_model`) and `moecpt vocab`: a tiny Mixtral
with the real Mixtral tokenizer extended on Japanese text, and a tiny tied Qwen3-MoE (with padding rows past
its tokenizer, as Qwen's) with a small byte-level tokenizer.json extended through the CLI. What must hold:
transformers loads the result with no missing or unexpected key; the logits of the old vocabulary on old
tokens are exactly the original model's; each new row (embedding and LM head) is the mean of the rows of the
new piece's tokens under the old tokenizer; config vocab_size counts the new rows; the tokenizer travels with
the model and transformers reads it as moecpt does."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

import moecpt
from moecpt.data.tokenizer import load_tokenizer
from moecpt.data.vocab import extend_tokenizer
from moecpt.errors import UserError
from moecpt.tools.vocab import RESIZE_FILE, register, resize_model

from ..corpora import SHARED_DATA
from ..data.test_vocab import byte_level_tokenizer, heldout, sp_proto
from ..model.hf_models import make_hf_model

transformers = pytest.importorskip("transformers")

JA_DEV = SHARED_DATA / "corpus" / "ja" / "wikipedia_dev.jsonl"


def loaded(cls, path: Path):
    model, info = cls.from_pretrained(path, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info  # no missing, unexpected or mismatched key
    return model.eval()


def old_logits(model, ids: torch.Tensor, old_size: int) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[..., :old_size]


def test_mixtral_resize_keeps_old_logits_exactly_and_starts_new_rows_at_the_means(tmp_path, shared_data):
    import sentencepiece as spm

    hf = make_hf_model(tmp_path / "base", vocab_size=32000)
    tok_dir = extend_tokenizer(None, [JA_DEV], 300, tmp_path / "tok")
    report = resize_model(tmp_path / "base", tok_dir, tmp_path / "out")
    assert report["old_logits_max_abs_diff"] == 0.0
    assert (report["old_rows"], report["new_rows"], report["new_pieces"]) == (32000, 32300, 300)
    assert json.loads((tmp_path / "out" / RESIZE_FILE).read_text())["new_rows"] == 32300
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 32300

    resized = loaded(transformers.MixtralForCausalLM, tmp_path / "out")
    ids = torch.randint(0, 32000, (2, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(old_logits(resized, ids, 32000), old_logits(hf, ids, 32000))

    # The old tokenizer's tokens of each new piece, found here with sentencepiece itself.
    proto = sp_proto(Path(load_tokenizer(None).path))
    proto.normalizer_spec.add_dummy_prefix = False  # a piece's text as it is
    base = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    new = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    parts = base.encode([new.id_to_piece(i).replace("▁", " ") for i in range(32000, 32300)])
    for old_w, new_w in ((hf.model.embed_tokens.weight, resized.model.embed_tokens.weight),
                         (hf.lm_head.weight, resized.lm_head.weight)):
        assert torch.equal(new_w[:32000], old_w)
        means = torch.stack([old_w[p].mean(0) for p in parts])
        torch.testing.assert_close(new_w[32000:], means, rtol=0, atol=1e-7)

    # The tokenizer in the output directory: transformers reads it as moecpt does, and moecpt trains on it.
    text = heldout("ja")[0][:500]
    ours = load_tokenizer(tmp_path / "out")
    assert ours.vocab_size == 32300 and ours.encode(text) == load_tokenizer(tok_dir).encode(text)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert theirs(text, add_special_tokens=False).input_ids == ours.encode(text)
    model = moecpt.from_pretrained(tmp_path / "out")
    ids = ours.encode(text)
    first_new = next(k for k, i in enumerate(ids) if i >= 32000)
    batch = torch.tensor([ids[max(0, first_new - 24):first_new + 24]])
    assert torch.isfinite(model(batch, labels=batch).loss)


def qwen3_moe(path: Path, vocab_size: int):
    config = transformers.Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=40, moe_intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


def vocab_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="moecpt")
    register(parser.add_subparsers())
    args = parser.parse_args(["vocab", *argv])
    return args.func(args)


def test_qwen3_moe_tied_with_padding_rows_resized_through_the_cli(tmp_path, shared_data, capsys):
    base_tok = byte_level_tokenizer(tmp_path / "base_tok", heldout("en") * 3)
    old_size = load_tokenizer(base_tok).vocab_size  # 400 pieces + 3 special tokens
    hf = qwen3_moe(tmp_path / "base", vocab_size=old_size + 17)  # 17 padding rows, as Qwen's
    assert vocab_cli("extend", "--tokenizer", str(base_tok), "--corpus", str(JA_DEV), "--add", "60",
                     "--out", str(tmp_path / "tok")) == 0
    assert json.loads(capsys.readouterr().out)["added"] == 60
    assert vocab_cli("resize", str(tmp_path / "base"), str(tmp_path / "tok"), str(tmp_path / "out")) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["old_rows"], report["new_rows"], report["old_logits_max_abs_diff"]) == (
        old_size + 17, old_size + 60, 0.0)

    resized = loaded(transformers.Qwen3MoeForCausalLM, tmp_path / "out")
    assert resized.config.vocab_size == old_size + 60
    assert resized.lm_head.weight.data_ptr() == resized.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, old_size, (2, 20), generator=torch.Generator().manual_seed(1))
    assert torch.equal(old_logits(resized, ids, old_size), old_logits(hf, ids, old_size))

    from tokenizers import Tokenizer

    old_model = Tokenizer.from_file(str(base_tok / "tokenizer.json")).model
    vocab = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["model"]["vocab"]
    new_pieces = sorted((i, t) for t, i in vocab.items() if i >= old_size)
    old_w, new_w = hf.model.embed_tokens.weight, resized.model.embed_tokens.weight
    assert torch.equal(new_w[:old_size], old_w[:old_size])
    means = torch.stack([old_w[[t.id for t in old_model.tokenize(piece)]].mean(0) for _, piece in new_pieces])
    torch.testing.assert_close(new_w[old_size:], means, rtol=0, atol=1e-7)  # padding rows taken first

    assert vocab_cli("report", str(base_tok), str(tmp_path / "out"), "--ja", str(JA_DEV),
                     "--en", str(SHARED_DATA / "corpus" / "en" / "wikipedia_ai.jsonl")) == 0
    numbers = json.loads(capsys.readouterr().out)
    assert numbers["ja"]["change"] < -0.2 and abs(numbers["en"]["change"]) < 0.02


def test_resize_refuses_a_model_that_does_not_go_with_the_tokenizer(tmp_path, shared_data):
    base_tok = byte_level_tokenizer(tmp_path / "base_tok", heldout("en") * 3)
    tok = extend_tokenizer(base_tok, [JA_DEV], 20, tmp_path / "tok")
    qwen3_moe(tmp_path / "small", vocab_size=300)  # fewer rows than the tokenizer it is said to extend
    with pytest.raises(UserError, match="300 embedding rows, fewer than the 403 ids"):
        resize_model(tmp_path / "small", tok, tmp_path / "out")
    with pytest.raises(UserError, match="must be a new directory"):
        resize_model(tmp_path / "small", tok, tmp_path / "small")
    (tok / "vocab_extension.json").unlink()  # an extended tokenizer from elsewhere: the model's own is needed
    with pytest.raises(UserError, match="has no tokenizer to compare it with"):
        resize_model(tmp_path / "small", tok, tmp_path / "out")


def test_deepseek_v3_with_an_mtp_layer_grows_every_vocabulary_tensor(tmp_path, shared_data):
    from safetensors import safe_open

    from moecpt.model import build_model
    from moecpt.model.families import preset_config

    base_tok = byte_level_tokenizer(tmp_path / "base_tok", heldout("en") * 3)
    old_size = load_tokenizer(base_tok).vocab_size
    config = preset_config("deepseek-v3-tiny", vocab_size=old_size, num_nextn_predict_layers=1)
    build_model(config, device="cpu", seed=0).save_pretrained(tmp_path / "base")
    tok = extend_tokenizer(base_tok, [JA_DEV], 30, tmp_path / "tok")
    report = resize_model(tmp_path / "base", tok, tmp_path / "out")
    assert (report["new_rows"], report["old_logits_max_abs_diff"]) == (old_size + 30, 0.0)
    with safe_open(str(tmp_path / "base" / "model.safetensors"), "pt") as old, \
            safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as new:
        grown = {k for k in old.keys() if old.get_slice(k).get_shape()[0] == old_size}
        assert len(grown) == 4  # embedding, LM head and the MTP layer's copies of both
        for k in old.keys():
            want = [old_size + 30, *old.get_slice(k).get_shape()[1:]] if k in grown else old.get_slice(k).get_shape()
            assert new.get_slice(k).get_shape() == want, k
            if k in grown:
                assert torch.equal(new.get_tensor(k)[:old_size], old.get_tensor(k))
    assert moecpt.from_pretrained(tmp_path / "out").config.vocab_size == old_size + 30
