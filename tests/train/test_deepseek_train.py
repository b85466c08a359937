"""`moecpt train` from a transformers-written DeepSeek-V3 directory: steps run with the aux-loss-free selection
bias moving, a kill -9 after a checkpoint and a rerun reproduce the uninterrupted run, and the export is a
directory transformers loads with no missing or unexpected key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .test_families_train_2 import kill_9_and_resume, train_and_export, write_config

transformers = pytest.importorskip("transformers")

NO_OVERRIDES = {"model": {"overrides": {}}}  # the tiny config's shape overrides do not apply to MLA


def deepseek_base(path: Path) -> Path:
    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(
        vocab_size=32000, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
        topk_group=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    transformers.DeepseekV3ForCausalLM(cfg).save_pretrained(path)
    return path


def test_deepseek_v3_init_from_trains_and_exports_what_transformers_loads(tmp_path, tiny_corpora, shard_cache):
    base = deepseek_base(tmp_path / "base")
    out, records = train_and_export(write_config(tmp_path, shard_cache, tiny_corpora, base, **NO_OVERRIDES), tmp_path)
    assert all(r["lb_loss"] > 0 for r in records)  # computed for the log; its weight is 0 by default
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and "router_bias_update_rate" not in config
    reloaded, info = transformers.DeepseekV3ForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    after = load_file(str(out / "model.safetensors"))
    bias = after["model.layers.2.mlp.gate.e_score_correction_bias"]
    assert bias.abs().max() > 0  # moved by aux-loss-free balancing (it starts at zero) and exported
    assert torch.equal(reloaded.model.layers[2].mlp.gate.e_score_correction_bias, bias)


@pytest.mark.slow  # three training processes
def test_kill_9_and_resume_reproduce_the_uninterrupted_run(tmp_path, tiny_corpora, shard_cache):
    cfg = write_config(tmp_path, shard_cache, tiny_corpora, deepseek_base(tmp_path / "base"), **NO_OVERRIDES)
    a = kill_9_and_resume(cfg, tmp_path, steps=10, kill_after=(5, 7))
    assert any(k.endswith("e_score_correction_bias") for k in a)  # the bias state resumed too
