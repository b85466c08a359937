"""`moecpt train` from a Hugging Face directory of Qwen2-MoE and of OLMoE (written by transformers): a few
steps run, the loss includes the family's router losses, and the export is a directory transformers loads with
no missing or unexpected key, holding the trained weights.

Qwen2-MoE: a dense middle layer and a gated shared expert, on the tiny config's own tokenizer. OLMoE: clip_qkv,
the router z-loss of its pretraining, and the real OLMoE tokenizer.json (no BOS) from the shared data."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moecpt.cli import main
from moecpt.train.metrics import read_metrics

from ..tiny_config import tiny_config_toml
from .test_trainer import _run_cli, _wait_for_step, final_weights, losses

transformers = pytest.importorskip("transformers")

# The tiny training config overrides these (tests/tiny_config.py); a base model must have the same shape.
SHAPE = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2)


def write_config(tmp_path, shard_cache, corpora, base: Path, **changes) -> Path:
    path = tmp_path / "cfg.toml"
    path.write_text(tiny_config_toml(tmp_path / "run", shard_cache, corpora, changes, init_from=str(base)))
    return path


def train_and_export(cfg: Path, tmp_path: Path) -> tuple[Path, list[dict]]:
    """`moecpt train CFG` for 3 steps with an export at the end; the export directory and the step records."""
    assert main(["train", "--config", str(cfg), "--training.steps=3", "--checkpoint.export_at_end=true"]) == 0
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["loss"] > 0 for r in records)
    assert records[0]["samples_consumed"] == 4  # a fresh data position: continual pre-training
    exports = sorted(p.parent for p in (tmp_path / "run").rglob("config.json"))
    assert len(exports) == 1, exports
    return exports[0], records


def check_export(out: Path, base: Path, cls, changed: str) -> None:
    """transformers loads the export strictly, in the hub layout the base had, with the trained weights."""
    reloaded, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    before, after = load_file(str(base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    assert not torch.equal(before[changed], after[changed])
    ids = torch.randint(3, 1000, (1, 6), generator=torch.Generator().manual_seed(0))
    assert reloaded.eval().generate(ids, max_new_tokens=3, do_sample=False).shape[1] == 9


def test_qwen2_moe_init_from_trains_and_exports_what_transformers_loads(tmp_path, tiny_corpora, shard_cache):
    base = tmp_path / "qwen2_base"
    torch.manual_seed(0)
    cfg = transformers.Qwen2MoeConfig(
        vocab_size=32000, num_hidden_layers=3, moe_intermediate_size=24, shared_expert_intermediate_size=40,
        num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1], max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, **SHAPE)
    transformers.Qwen2MoeForCausalLM(cfg).save_pretrained(base)

    out, _ = train_and_export(write_config(tmp_path, shard_cache, tiny_corpora, base), tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe" and config["mlp_only_layers"] == [1]
    check_export(out, base, transformers.Qwen2MoeForCausalLM, "model.layers.2.mlp.shared_expert_gate.weight")


def test_olmoe_init_from_trains_with_its_z_loss_and_exports(tmp_path, tiny_corpora, shard_cache, shared_data):
    base = tmp_path / "olmoe_base"
    torch.manual_seed(0)
    cfg = transformers.OlmoeConfig(vocab_size=50304, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                                   clip_qkv=8.0, max_position_embeddings=256, **SHAPE)
    transformers.OlmoeForCausalLM(cfg).save_pretrained(base)
    shutil.copyfile(shared_data / "tokenizers" / "olmoe" / "tokenizer.json", base / "tokenizer.json")

    changes = {"model": {"overrides": {"router_z_loss_coef": 0.001}},
               "data": {"tokenizer": str(base / "tokenizer.json")}}
    out, records = train_and_export(write_config(tmp_path, shard_cache, tiny_corpora, base, **changes), tmp_path)
    assert all(r["z_loss"] > 0 and r["lb_loss"] > 0 for r in records)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "olmoe" and config["clip_qkv"] == 8.0 and "router_z_loss_coef" not in config
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    check_export(out, base, transformers.OlmoeForCausalLM, "model.layers.1.mlp.experts.0.up_proj.weight")


def family_base(family: str, path: Path) -> Path:
    """A tiny transformers-written directory of `family` (Qwen2-MoE: a dense middle layer and the gated shared
    expert; OLMoE: clip_qkv and whole-projection QK-norm)."""
    torch.manual_seed(0)
    shape = dict(vocab_size=32000, num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
                 max_position_embeddings=256, bos_token_id=1, eos_token_id=2, **SHAPE)
    if family == "qwen2_moe":
        hf = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            moe_intermediate_size=24, shared_expert_intermediate_size=40, mlp_only_layers=[1], **shape))
    else:
        hf = transformers.OlmoeForCausalLM(transformers.OlmoeConfig(clip_qkv=8.0, **shape))
    hf.save_pretrained(path)
    return path


@pytest.mark.slow  # three training processes per family
@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_kill_9_and_resume_reproduce_the_uninterrupted_run(family, tmp_path, tiny_corpora, shard_cache):
    """Killed with SIGKILL after its step-4 checkpoint and run again, a run of each family gives the
    uninterrupted run's losses and weights (shared expert, dense layer, QK-norm state included)."""
    cfg = write_config(tmp_path, shard_cache, tiny_corpora, family_base(family, tmp_path / "base"))
    kill_9_and_resume(cfg, tmp_path, steps=12, kill_after=(5, 9))


def kill_9_and_resume(cfg: Path, tmp_path: Path, steps: int, kill_after: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Run `cfg` whole, and again killed with SIGKILL after a random step in `kill_after` (past the step-4
    checkpoint) then rerun: the same loss at every step (each step once) and bit-identical final weights,
    which are returned."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    proc = _run_cli(cfg, f"--run_dir={whole}", f"--training.steps={steps}")
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    proc = _run_cli(cfg, f"--run_dir={cut}", f"--training.steps={steps}")
    _wait_for_step(cut, proc, random.Random(os.getpid()).randint(*kill_after))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert losses(cut)[-1][0] < steps, "the run ended before it could be killed"
    proc = _run_cli(cfg, f"--run_dir={cut}", f"--training.steps={steps}")
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and "resumed from" in out, out
    assert losses(cut) == losses(whole)
    a, b = final_weights(whole), final_weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return a
