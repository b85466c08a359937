"""The model side: prompt encoding and truncation, stopping, the two ways of reading generated text back,
batched generation, and held-out bits per byte."""

from __future__ import annotations

import inspect
import json
import math
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from moecpt.eval import heldout  # noqa: E402
from moecpt.eval.lm import ModelLM, Request, clean_up_tokenization, load_eval_tokenizer, load_model  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_eval_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir, dtype="float32", device="cpu")


class Canned(torch.nn.Module):
    """A stand-in model whose generate appends fixed tokens (then pad), to test how text is read back."""

    def __init__(self, new_ids, max_len=64):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_position_embeddings=max_len)
        self.new_ids = new_ids
        self.calls = []

    def generate(self, input_ids, attention_mask=None, max_new_tokens=16, eos_token_id=None, pad_token_id=0, **_):
        self.calls.append((input_ids.clone(), attention_mask.clone(), max_new_tokens, eos_token_id))
        new = torch.tensor(self.new_ids[:max_new_tokens]).repeat(input_ids.shape[0], 1)
        return torch.cat([input_ids, new], dim=1)


def test_prompt_starts_with_bos_and_is_left_truncated(tokenizer):
    lm = ModelLM(Canned([]), tokenizer, max_length=32)
    ids = lm.encode_prompt("これは長い文章です。" * 20, max_new_tokens=8)
    assert ids[0] == tokenizer.bos_id == 1
    assert len(ids) == 32 - 8
    assert ids[1:] == tokenizer.encode("これは長い文章です。" * 20)[-(32 - 8 - 1):]
    assert lm.encode_prompt("短い", 8) == [1] + tokenizer.encode("短い")


def test_max_length_is_bounded_by_the_model(tokenizer):
    assert ModelLM(Canned([], max_len=64), tokenizer, max_length=4096).max_length == 64
    assert ModelLM(Canned([], max_len=32768), tokenizer).max_length == 4096


def test_newline_and_eos_stop_generation(tokenizer):
    newline = tokenizer.encode("\n")[-1]
    lm = ModelLM(Canned([]), tokenizer)
    stops = lm.stop_ids(("\n",))
    assert newline in stops and tokenizer.eos_id in stops
    assert all("\n" in tokenizer.decode([i]) for i in stops if i != tokenizer.eos_id)


def test_generated_text_is_read_back_like_each_reference_tool(tokenizer):
    two = tokenizer.encode("答え 2")[-2:]  # "▁", "2": a digit after a space
    assert tokenizer.decode(two) == "2"  # SentencePiece drops the leading space of a decoded sequence
    newline = tokenizer.encode("\n")[-1]
    rest = tokenizer.encode("後ろ")
    model = Canned([*two, newline, *rest, tokenizer.eos_id])
    lm = ModelLM(model, tokenizer, max_length=64)
    # the Hugging Face pipeline (llm-jp-eval) keeps the space the model produced; the harnesses do not
    assert lm.complete([Request("質問\n", 6, ("\n",), "after_prompt")]) == [" 2"]
    assert lm.complete([Request("質問\n", 6, ("\n",), "new_tokens")]) == ["2"]
    # with no stop string the text runs to EOS (exclusive)
    assert lm.complete([Request("質問\n", 9, (), "new_tokens")]) == ["2\n 後ろ"]
    # stopping ids handed to generate: EOS plus the newline token
    assert tokenizer.eos_id in model.calls[0][3] and newline in model.calls[0][3]


def test_after_prompt_read_back_cleans_up_tokenization_spaces(tokenizer):
    """The text-generation pipeline decodes with clean_up_tokenization_spaces=True (transformers' default
    there): " ." -> ".", " n't" -> "n't", ... on the decoded prompt + answer and on the decoded prompt."""
    answer = tokenizer.encode("Yes , it is n't .")
    lm = ModelLM(Canned([*answer, tokenizer.eos_id]), tokenizer, max_length=64)
    assert lm.complete([Request("Q: is it ?\nA:", 12, ("\n",), "after_prompt")]) == [" Yes, it isn't."]
    assert lm.complete([Request("Q: is it ?\nA:", 12, ("\n",), "new_tokens")]) == ["Yes , it is n't ."]
    transformers = pytest.importorskip("transformers")
    method = transformers.PreTrainedTokenizerBase.clean_up_tokenization  # a staticmethod before transformers 5
    clean = method if isinstance(inspect.getattr_static(transformers.PreTrainedTokenizerBase,
                                                        "clean_up_tokenization"), staticmethod) else (
        lambda text: method(None, text))
    for text in ("Yes , it is n't .", "I 'm here ! Are you ? ' quoted ' we 've they 're it 's", "日本 。 , ."):
        assert clean_up_tokenization(text) == clean(text)


def test_pieces_and_head(tokenizer):
    lm = ModelLM(Canned([]), tokenizer)
    assert lm.pieces("鬱 a") == ["▁", "<0xE9>", "<0xAC>", "<0xB1>", "▁a"]
    assert lm.head("今日は晴れです。明日は雨です。", 3) == tokenizer.decode(tokenizer.encode("今日は晴れです。")[:3])
    assert lm.head("短い", 100) == "短い" and lm.head("短い", 0) == ""


def test_batch_is_left_padded_with_mask(tokenizer):
    model = Canned([tokenizer.eos_id])
    lm = ModelLM(model, tokenizer, max_length=64)
    lm.complete([Request("短い", 1, ("\n",)), Request("もう少し長い文章です", 1, ("\n",))])
    ids, mask, _, _ = model.calls[0]
    short = [1] + tokenizer.encode("短い")
    assert ids[0, -len(short):].tolist() == short
    assert mask[0].tolist() == [0] * (ids.shape[1] - len(short)) + [1] * len(short)
    assert mask[1].all()


def test_batched_greedy_equals_one_by_one(model, tokenizer):
    lm = ModelLM(model, tokenizer, max_length=256, batch_size=4)
    reqs = [Request(p, 6, ("\n",)) for p in ("ニュース記事:今日は晴れ。\n要約:", "English phrase: Hello\nJapanese phrase:",
                                              "問題：1+1は？\nステップごとの答え：")]
    together = lm.complete(reqs)
    assert together == [lm.complete([r])[0] for r in reqs]


def test_bits_per_byte_equals_summed_cross_entropy(model, tokenizer):
    text = "吾輩は猫である。名前はまだ無い。"
    ids = [tokenizer.bos_id] + tokenizer.encode(text)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    nats = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
    out = heldout.heldout_bits_per_byte(model, tokenizer, [text], max_length=256)
    assert out["bits_per_byte"] == pytest.approx(nats / math.log(2) / len(text.encode("utf-8")), rel=1e-5)
    assert out["tokens"] == len(ids) - 1 and out["bytes"] == len(text.encode("utf-8")) and out["docs"] == 1
    # a context shorter than the document: windows still predict every token once
    short = heldout.heldout_bits_per_byte(model, tokenizer, [text], max_length=5)
    assert short["tokens"] == out["tokens"] and math.isfinite(short["bits_per_byte"])


def test_windows_predict_each_token_once():
    ids = list(range(11))
    wins = heldout.windows(ids, 4)
    assert all(len(w) <= 4 for w in wins)
    predicted = [t for w in wins for t in w[1:]]
    assert predicted == ids[1:]
    assert heldout.windows(ids, 20) == [ids]


def test_heldout_corpora_resolution(tmp_path):
    (tmp_path / "corpus/ja").mkdir(parents=True)
    (tmp_path / "corpus/ja/wikipedia_dev.jsonl").write_text(json.dumps({"text": "テスト"}) + "\n", "utf-8")
    assert heldout.resolve_heldout("auto", {"ja", "en"}, tmp_path) == {
        "ja_wikipedia_dev": tmp_path / "corpus/ja/wikipedia_dev.jsonl"}
    assert heldout.resolve_heldout("none", {"ja"}, tmp_path) == {}
    assert heldout.resolve_heldout("x=a.jsonl,y=b.jsonl", {"ja"}, None) == {"x": tmp_path.__class__("a.jsonl"),
                                                                          "y": tmp_path.__class__("b.jsonl")}
    with pytest.raises(heldout.UserError, match="NAME=FILE"):
        heldout.resolve_heldout("justapath.jsonl", {"ja"}, None)
    assert heldout.read_texts(tmp_path / "corpus/ja/wikipedia_dev.jsonl") == ["テスト"]


def test_trainer_checkpoint_and_run_directory_load_like_the_export(tmp_path, tiny_model_dir):
    import dataclasses

    from moecpt.eval.lm import model_identity
    from moecpt.model import MixtralForCausalLM, load_config
    from moecpt.train.checkpoint import save_checkpoint

    exported = load_model(tiny_model_dir, dtype="float32", device="cpu")
    model = MixtralForCausalLM(load_config(tiny_model_dir))
    model.load_state_dict(exported.state_dict())
    optimizer = torch.optim.AdamW(model.parameters())
    state = {"model_config": dataclasses.asdict(model.config), "tokenizer": None}
    ckpt = save_checkpoint(tmp_path / "run/checkpoints", 7, model, optimizer, state)

    ids = torch.tensor([[1, 28705, 29543, 29585, 13, 28750]])
    with torch.no_grad():
        want = exported(ids).logits
        for path in (ckpt, tmp_path / "run"):
            loaded = load_model(path, dtype="float32", device="cpu")
            assert torch.equal(loaded(ids).logits, want)
    assert model_identity(tmp_path / "run")["path"] == str(ckpt.resolve())
    save_checkpoint(tmp_path / "run/checkpoints", 8, model, optimizer, state)
    assert model_identity(tmp_path / "run")["path"].endswith("step_00000008")  # a new checkpoint is a new model
