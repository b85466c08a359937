"""`moecpt train` from a transformers-written gpt-oss directory (sinks, alternating sliding/full attention,
router and experts with biases, the clamped SwiGLU): steps run, a kill -9 after a checkpoint and a rerun
reproduce the uninterrupted run, and the export is a directory transformers loads with no missing or
unexpected key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .test_families_train_2 import kill_9_and_resume, train_and_export, write_config

transformers = pytest.importorskip("transformers")

NO_OVERRIDES = {"model": {"overrides": {}}}  # the tiny config's shape overrides are Mixtral's


def gpt_oss_base(path: Path) -> Path:
    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(
        vocab_size=32000, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
        max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    transformers.GptOssForCausalLM(cfg).save_pretrained(path)
    return path


def test_gpt_oss_init_from_trains_and_exports_what_transformers_loads(tmp_path, tiny_corpora, shard_cache):
    base = gpt_oss_base(tmp_path / "base")
    before = load_file(str(base / "model.safetensors"))
    out, records = train_and_export(write_config(tmp_path, shard_cache, tiny_corpora, base, **NO_OVERRIDES), tmp_path)
    assert all(r["lb_loss"] > 0 for r in records)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt_oss" and "quantization_config" not in config
    reloaded, info = transformers.GptOssForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    after = load_file(str(out / "model.safetensors"))
    for name in ("model.layers.0.self_attn.sinks", "model.layers.1.mlp.router.bias",
                 "model.layers.1.mlp.experts.gate_up_proj_bias", "model.layers.0.mlp.experts.down_proj"):
        assert not torch.equal(after[name].float(), before[name].float()), f"{name} was not trained"
        assert torch.equal(reloaded.state_dict()[name], after[name])


@pytest.mark.slow  # three training processes
def test_kill_9_and_resume_reproduce_the_uninterrupted_run(tmp_path, tiny_corpora, shard_cache):
    cfg = write_config(tmp_path, shard_cache, tiny_corpora, gpt_oss_base(tmp_path / "base"), **NO_OVERRIDES)
    a = kill_9_and_resume(cfg, tmp_path, steps=10, kill_after=(5, 7))
    assert any(k.endswith("self_attn.sinks") for k in a) and any(k.endswith("gate_up_proj_bias") for k in a)
