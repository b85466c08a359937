"""Corrupt or mismatched checkpoints fail loudly, listing what is wrong; nothing loads partially."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import moecpt
from moecpt.errors import UserError

from .hf_models import make_hf_model

pytest.importorskip("transformers")


@pytest.fixture
def ckpt(tmp_path):
    make_hf_model(tmp_path)
    return tmp_path


def _rewrite(ckpt, change):
    tensors = load_file(str(ckpt / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(ckpt / "model.safetensors"))


def test_dropped_expert_weights_are_reported_missing(ckpt):
    def drop(t):
        for k in [k for k in t if ".experts." in k and "layers.1" in k]:
            del t[k]

    _rewrite(ckpt, drop)
    with pytest.raises(UserError) as e:
        moecpt.from_pretrained(ckpt)
    msg = str(e.value)
    assert "missing (12)" in msg and "model.layers.1.block_sparse_moe.experts.0.w1.weight" in msg
    assert "nothing was loaded" in msg


def test_unexpected_and_misshaped_tensors_are_listed(ckpt):
    def change(t):
        t["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
        t["model.layers.1.block_sparse_moe.experts.2.w2.weight"] = torch.zeros(32, 47)

    _rewrite(ckpt, change)
    with pytest.raises(UserError) as e:
        moecpt.from_pretrained(ckpt)
    msg = str(e.value)
    assert "unexpected (1): model.layers.0.self_attn.q_proj.bias" in msg
    assert "mis-shaped (1): model.layers.1.block_sparse_moe.experts.2.w2.weight: file (32, 47), config (32, 48)" in msg


def test_config_that_disagrees_with_the_weights(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_local_experts"] = 8
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"missing \(24\)"):
        moecpt.from_pretrained(ckpt)


def test_truncated_safetensors_file(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        moecpt.from_pretrained(ckpt)


def test_missing_files_and_wrong_model_type(tmp_path, ckpt):
    with pytest.raises(UserError, match="not a directory"):
        moecpt.from_pretrained(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no config.json"):
        moecpt.from_pretrained(empty)
    (empty / "config.json").write_text((ckpt / "config.json").read_text())
    with pytest.raises(UserError, match="no model.safetensors or model.safetensors.index.json"):
        moecpt.from_pretrained(empty)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="model_type is 'llama'"):
        moecpt.from_pretrained(ckpt)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="invalid JSON at line 1"):
        moecpt.from_pretrained(ckpt)


def test_index_naming_an_absent_shard(tmp_path):
    make_hf_model(tmp_path / "src")
    model = moecpt.from_pretrained(tmp_path / "src")
    model.save_pretrained(tmp_path / "out", max_shard_size="40KB")
    victim = sorted((tmp_path / "out").glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(UserError, match=f"shard file.*{victim.name}"):
        moecpt.from_pretrained(tmp_path / "out")


def test_mixed_layouts_are_refused(ckpt):
    _rewrite(ckpt, lambda t: t.__setitem__("model.layers.0.mlp.experts.down_proj", torch.zeros(4, 32, 48)))
    with pytest.raises(UserError, match="mixes the hub expert layout"):
        moecpt.from_pretrained(ckpt)


def test_resaving_to_fewer_shards_removes_stale_ones(tmp_path):
    make_hf_model(tmp_path / "src")
    model = moecpt.from_pretrained(tmp_path / "src")
    model.save_pretrained(tmp_path / "out", max_shard_size="40KB")
    model.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    moecpt.from_pretrained(tmp_path / "out")


def test_saved_weights_are_readable_like_the_other_files(tmp_path):
    make_hf_model(tmp_path / "src")
    moecpt.from_pretrained(tmp_path / "src").save_pretrained(tmp_path / "out")
    weights = (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777
    config = (tmp_path / "out" / "config.json").stat().st_mode & 0o777
    assert weights == config
