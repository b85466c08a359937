"""`moecpt merge`: averages and task vectors are exact (the float64 value of the formula, rounded once to
float32) for every family the model layer has, from Hugging Face directories and moecpt checkpoints alike;
embeddings merged, merged on shared rows or skipped; mismatches refused, naming the tensors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import moecpt
from moecpt.cli import main
from moecpt.errors import UserError
from moecpt.model import build_model
from moecpt.model.families import FAMILIES
from moecpt.tools.merge import TaskVector, merge, model_tensors
from moecpt.train.checkpoint import save_checkpoint


def tiny_config(model_type: str, **overrides):
    cls = FAMILIES[model_type].config_cls
    preset = next(name for name in cls.presets if "tiny" in name)
    return cls.from_preset(preset, **{"vocab_size": 64, **overrides})


def save_random(path: Path, config, seed: int) -> Path:
    model = build_model(config, device="cpu", seed=seed)
    with torch.no_grad():  # norms and biases start constant: make every tensor differ between models
        for p in [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + p.numel())))
    model.save_pretrained(path)
    return path


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return {n: t.detach() for n, t in model_tensors(moecpt.from_pretrained(path)).items()}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_weighted_average_and_task_vector_are_exact(tmp_path, model_type):
    config = tiny_config(model_type)
    a, b, c = (save_random(tmp_path / n, config, seed) for n, seed in (("a", 1), ("b", 2), ("c", 3)))
    A, B, C = tensors(a), tensors(b), tensors(c)

    avg = tensors(merge(tmp_path / "avg", average=[a, b, c], weights=[1, 2, 3]))
    w = [1 / 6, 2 / 6, 3 / 6]
    for name in A:
        want = (w[0] * A[name].double() + w[1] * B[name].double() + w[2] * C[name].double()).float()
        assert torch.equal(avg[name], want), name

    tv = tensors(merge(tmp_path / "tv", task_vector=TaskVector(base=c, plus=a, minus=b, scale=0.7)))
    for name in A:
        want = ((A[name].double() - B[name].double()) * 0.7 + C[name].double()).float()
        assert torch.equal(tv[name], want), name
        if not name.endswith("bias") or C[name].any():
            assert not torch.equal(tv[name], C[name]), name  # every tensor took part


def test_checkpoints_and_hf_directories_merge_alike(tmp_path):
    config = tiny_config("mixtral")
    hf_dir = save_random(tmp_path / "hf", config, 1)
    model = moecpt.from_pretrained(save_random(tmp_path / "src", config, 2))
    state = {"model_type": config.model_type, "model_config": dataclasses.asdict(config)}
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoints", 5, model, torch.optim.SGD(model.parameters(), lr=0.1),
                           state)
    out = tensors(merge(tmp_path / "m", average=[hf_dir, tmp_path / "run"]))  # a run directory: its checkpoint
    src, first = tensors(tmp_path / "src"), tensors(hf_dir)
    assert ckpt.parent.parent == tmp_path / "run"
    for name in src:
        assert torch.equal(out[name], (0.5 * first[name].double() + 0.5 * src[name].double()).float()), name


def test_embedding_rules_with_a_larger_vocabulary(tmp_path):
    """A vocabulary-expanded base (72 ids) with a chat vector from models of the original 64 ids."""
    base = save_random(tmp_path / "base", tiny_config("mixtral", vocab_size=72), 1)
    plus = save_random(tmp_path / "plus", tiny_config("mixtral"), 2)
    minus = save_random(tmp_path / "minus", tiny_config("mixtral"), 3)
    Bs, P, M = tensors(base), tensors(plus), tensors(minus)
    tv = TaskVector(base, plus, minus, 1.0)
    with pytest.raises(UserError, match=r"plus differ in shape .*: embed_tokens.weight \(64, 64\) \(first \(72, 64\)\), lm_head.weight .*shared_rows"):
        merge(tmp_path / "x", task_vector=tv)

    shared = tensors(merge(tmp_path / "shared", task_vector=tv, embeddings="shared_rows"))
    for name in ("embed_tokens.weight", "lm_head.weight"):
        want = ((P[name].double() - M[name].double()) + Bs[name][:64].double()).float()
        assert torch.equal(shared[name][:64], want) and torch.equal(shared[name][64:], Bs[name][64:])
    assert json.loads((tmp_path / "shared" / "merge.json").read_text())["vocab_rows_merged"] == {
        "embed_tokens.weight": 64, "lm_head.weight": 64}

    skipped = tensors(merge(tmp_path / "skip", task_vector=tv, embeddings="skip"))
    assert torch.equal(skipped["embed_tokens.weight"], Bs["embed_tokens.weight"])
    assert torch.equal(skipped["lm_head.weight"], Bs["lm_head.weight"])
    name = "norm.weight"
    assert torch.equal(skipped[name], ((P[name].double() - M[name].double()) + Bs[name].double()).float())


def test_mismatches_are_refused_naming_them(tmp_path):
    mixtral = save_random(tmp_path / "mixtral", tiny_config("mixtral"), 1)
    qwen3 = save_random(tmp_path / "qwen3", tiny_config("qwen3_moe"), 1)
    dense0 = save_random(tmp_path / "dense0", tiny_config("qwen3_moe", mlp_only_layers=(0, 1)), 2)
    wider = save_random(tmp_path / "wider", tiny_config("mixtral", num_local_experts=8), 3)
    with pytest.raises(UserError, match="qwen3 is a qwen3_moe model and .*mixtral a mixtral one"):
        merge(tmp_path / "x", average=[mixtral, qwen3])
    with pytest.raises(UserError, match=r"do not hold the same tensors\n  only in .*qwen3 \(\d+\): "
                                        r"layers.1.moe.experts.down_proj.*\n  only in .*dense0 \(\d+\): layers.1.mlp"):
        merge(tmp_path / "x", average=[qwen3, dense0])
    with pytest.raises(UserError, match=r"tensors of .*wider differ in shape from .*mixtral's \(6\): layers.0.moe.gate.weight \(8, 64\) \(first \(4, 64\)\), layers.0.moe.experts.gate_up_proj \(8, "):
        merge(tmp_path / "x", average=[mixtral, wider])
    with pytest.raises(UserError, match="either average .* or task_vector"):
        merge(tmp_path / "x", average=[mixtral], task_vector=(mixtral, mixtral, mixtral, 1.0))
    with pytest.raises(UserError, match="2 weights for 1 models"):
        merge(tmp_path / "x", average=[mixtral], weights=[1, 2])
    with pytest.raises(UserError, match="must be finite, >= 0"):
        merge(tmp_path / "x", average=[mixtral, mixtral], weights=[1, -1])
    with pytest.raises(UserError, match="embeddings 'rows'"):
        merge(tmp_path / "x", average=[mixtral], embeddings="rows")
    assert not (tmp_path / "x").exists()


def test_cli_chat_vector_copies_the_base_tokenizer(tmp_path, capsys):
    config = tiny_config("mixtral")
    base, a, b = (save_random(tmp_path / n, config, s) for n, s in (("base", 1), ("a", 2), ("b", 3)))
    (base / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}\n')
    (a / "tokenizer_config.json").write_text('{"tokenizer_class": "other"}\n')
    argv = ["merge", "--out", str(tmp_path / "out"), "--task-vector", str(base), "--plus", str(a), "--minus", str(b),
            "--scale", "0.5", "--dtype", "bfloat16"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["merged"] == str(tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == (base / "tokenizer_config.json").read_text()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert main(["merge", "--out", str(tmp_path / "y"), "--task-vector", str(base), "--plus", str(a)]) == 2
    assert "needs --task-vector BASE, --plus A and --minus B" in capsys.readouterr().err


def test_the_merge_streams_one_tensor_per_input(tmp_path, monkeypatch):
    """A chat vector from a Hugging Face base, a run directory and a Hugging Face minus: every tensor of each
    input is read once, and a tensor of an input is released before its next one is read (never a whole
    model, and no model loaded); merged a chunk of rows at a time, the values are those of the formula."""
    import weakref

    from moecpt.tools import merge as merge_mod
    from moecpt.train import checkpoint as ckpt_mod

    config = tiny_config("mixtral")
    base, minus = save_random(tmp_path / "base", config, 1), save_random(tmp_path / "minus", config, 3)
    plus = moecpt.from_pretrained(save_random(tmp_path / "plus_hf", config, 2))
    state = {"model_type": config.model_type, "model_config": dataclasses.asdict(config)}
    save_checkpoint(tmp_path / "run" / "checkpoints", 5, plus, torch.optim.SGD(plus.parameters(), lr=0.1), state)
    want = {n: t.detach().clone() for n, t in model_tensors(plus).items()}
    del plus

    def refuse(*args, **kwargs):
        raise AssertionError("merge loaded a whole model")

    monkeypatch.setattr(ckpt_mod, "load_model", refuse)
    monkeypatch.setattr(ckpt_mod, "load_model_weights", refuse)
    reads: dict[str, list[str]] = {}
    refs: dict[str, list] = {}
    read_tensors = merge_mod.ModelReader.tensors

    def tracked(self, names):
        for name, t in read_tensors(self, names):
            alive = [n for n, r in refs.get(self.path, []) if r() is not None]
            assert not alive, f"{self.path}: {alive} still held when {name} is read"
            refs.setdefault(self.path, []).append((name, weakref.ref(t.untyped_storage())))  # views too
            reads.setdefault(self.path, []).append(name)
            yield name, t
            del t

    monkeypatch.setattr(merge_mod.ModelReader, "tensors", tracked)
    monkeypatch.setattr(merge_mod, "CHUNK", 1000)  # several chunks per tensor: the same values as one
    out = tensors(merge(tmp_path / "tv", task_vector=TaskVector(base, tmp_path / "run", minus, 0.5)))
    B, M = tensors(base), tensors(minus)
    assert {p: len(n) for p, n in reads.items()} == {str(p): len(B) for p in (base, tmp_path / "run", minus)}
    for name in B:
        assert torch.equal(out[name], ((want[name].double() - M[name].double()) * 0.5 + B[name].double()).float())
