"""Streamed export: `moecpt export` of a DCP checkpoint saved on 2 ranks with expert parallelism writes, tensor
by tensor, the same safetensors bytes as the export of a one-process checkpoint of the same weights; the
end-of-training export of a sharded model gathers one tensor at a time and writes the same tensors; a
Qwen-style tokenizer.json round-trips through transformers.AutoTokenizer with the same ids."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moecpt.config import OptimizerSection
from moecpt.model import build_model, from_pretrained
from moecpt.train import checkpoint as ckpt_lib
from moecpt.train.export import export_checkpoint, export_tokenizer
from moecpt.train.optim import build_optimizer

from .streamed_worker import EP_CONFIG, run_once


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.safetensors"))} | \
        {p.name: p.read_bytes() for p in d.glob("*.index.json")}


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for p in sorted(d.glob("*.safetensors")):
        with safe_open(str(p), framework="pt") as f:
            out |= {k: f.get_tensor(k) for k in f.keys()}
    return out


def test_export_of_a_two_rank_ep_checkpoint_equals_the_one_process_export(tmp_path):
    from moecpt.cli import main

    root = run_once()
    two_rank = root / "out" / "checkpoints" / "step_00000001"
    # The same weights saved by one process.
    model = build_model(EP_CONFIG)
    model.to_empty(device="cpu")
    model.init_buffers()
    ckpt_lib.load_model_weights(root / "src" / "ep-hub", model)
    state = {"model_type": "mixtral", "model_config": dataclasses.asdict(EP_CONFIG), "data": {}}
    one = ckpt_lib.save_checkpoint(tmp_path / "one", 1, model, build_optimizer(model, OptimizerSection(),
                                                                                 torch.device("cpu")), state)
    assert main(["export", str(two_rank), str(tmp_path / "hf2"), "--max-shard-size=20KB"]) == 0
    export_checkpoint(one, tmp_path / "hf1", None, max_shard_size="20KB")
    a, b = _files(tmp_path / "hf2"), _files(tmp_path / "hf1")
    assert len(a) > 3 and a.keys() == b.keys()  # several shards and their index
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    # The weights are those of the source, and transformers-style loading reads them back.
    src = _tensors(root / "src" / "ep-hub")
    got = _tensors(tmp_path / "hf2")
    assert got.keys() == src.keys() and all(torch.equal(got[k], src[k]) for k in src)
    reloaded = from_pretrained(tmp_path / "hf2").state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in model.state_dict().items())
    # The end-of-training export of the live 2-rank model: the same tensors, gathered one at a time.
    live = _tensors(root / "out" / "live_hf")
    assert live.keys() == src.keys() and all(torch.equal(live[k], src[k]) for k in src)


def test_export_casts_to_the_asked_dtype(tmp_path):
    root = run_once()
    out = export_checkpoint(root / "out" / "checkpoints" / "step_00000001", tmp_path / "bf16", None,
                            dtype=torch.bfloat16)
    got = _tensors(out)
    src = _tensors(root / "src" / "ep-hub")
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], src[k].bfloat16()) for k in src)


def test_qwen_tokenizer_json_round_trips_through_autotokenizer(shared_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    from moecpt.data.tokenizer import load_tokenizer

    src = shared_data / "tokenizers" / "qwen3"
    written = export_tokenizer(src, tmp_path, 4096)
    assert "tokenizer.json" in written and "tokenizer_config.json" in written
    ours = load_tokenizer(src)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in ["吾輩は猫である。名前はまだ無い。", "To be, or not to be: that is the question.\n\n  x = 1 + 2",
                 "Ünïcödé — emoji 🙂 and tabs\tend"]:
        assert theirs(text)["input_ids"] == ours.encode(text), text
        assert theirs.decode(ours.encode(text)) == text
    # The publisher's own tokenizer_config.json (its special tokens and BOS/EOS flags) goes with it as it is.
    assert (tmp_path / "tokenizer_config.json").read_bytes() == (src / "tokenizer_config.json").read_bytes()
    assert theirs.bos_token_id is None and ours.bos_id is None  # Qwen adds no BOS, in either reading
