"""`moecpt train` from a Hugging Face directory of a family other than Mixtral: it trains, resumes exactly after
kill -9, and exports a directory transformers loads (weights, config and the publisher's tokenizer).

Qwen3-MoE: a tiny random transformers model with a dense first layer, tied embeddings and the real Qwen3
vocabulary, trained on the shared corpora tokenized with Qwen3's own tokenizer.json (no BOS)."""

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

from moecpt.config import load_config
from moecpt.train import checkpoint as ckpt_lib
from moecpt.train.metrics import read_metrics
from moecpt.train.trainer import train

from ..tiny_config import tiny_config_toml
from .test_trainer import _run_cli, _wait_for_step, final_weights, losses

transformers = pytest.importorskip("transformers")

QWEN3_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


@pytest.fixture(scope="module")
def qwen3_base(tmp_path_factory, shared_data) -> Path:
    """A Hugging Face Qwen3-MoE directory as transformers writes it, with Qwen3's tokenizer files beside it."""
    path = tmp_path_factory.mktemp("qwen3_base")
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=151936, hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, mlp_only_layers=[0], tie_word_embeddings=True, max_position_embeddings=256,
        bos_token_id=151643, eos_token_id=151643)
    transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(path)
    for name in QWEN3_TOKENIZER_FILES:
        shutil.copyfile(shared_data / "tokenizers" / "qwen3" / name, path / name)
    return path


@pytest.fixture
def qwen3_config(tmp_path, corpora, shard_cache, qwen3_base):
    """Write a training config that continues `qwen3_base` on the tiny corpora; returns its path."""

    def write(**training) -> Path:
        changes = {
            "model": {"overrides": {"router_aux_loss_coef": 0.01}},
            "data": {"tokenizer": str(qwen3_base / "tokenizer.json")},
            "training": {"steps": 10, "global_batch": 4, "micro_batch": 2, "seed": 7, **training},
        }
        path = tmp_path / "qwen3.toml"
        path.write_text(tiny_config_toml(tmp_path / "run", shard_cache, corpora, changes, init_from=str(qwen3_base)))
        return path

    return write


def test_qwen3_moe_init_from_trains_and_exports_what_transformers_loads(qwen3_config, qwen3_base, tmp_path):
    cfg = load_config(qwen3_config(steps=3), ["--checkpoint.export_at_end=true"])
    result = train(cfg)
    assert result["reason"] == "finished"
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["loss"] > 0 for r in records)
    assert records[0]["samples_consumed"] == 4  # a fresh data position: continual pre-training
    trained_with = ckpt_lib.saved_model_config(ckpt_lib.find_checkpoint(tmp_path / "run"))
    assert type(trained_with).__name__ == "Qwen3MoeConfig" and trained_with.mlp_only_layers == (0,)
    # Qwen3's balancing regime comes with the family; the override is applied
    assert (trained_with.router_balance_scope, trained_with.router_aux_loss_coef) == ("global", 0.01)

    out = Path(result["export"])
    assert {"config.json", "model.safetensors", *QWEN3_TOKENIZER_FILES} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3_moe"
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(reloaded).__name__ == "Qwen3MoeForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert reloaded.config.mlp_only_layers == [0] and reloaded.config.tie_word_embeddings
    base = load_file(str(qwen3_base / "model.safetensors"))
    trained = load_file(str(out / "model.safetensors"))
    assert base.keys() == trained.keys()  # the same hub layout, dense layer 0 included
    assert not torch.equal(trained["model.layers.1.mlp.experts.0.gate_proj.weight"],
                           base["model.layers.1.mlp.experts.0.gate_proj.weight"])
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("吾輩は猫である", return_tensors="pt").input_ids
    assert ids.shape[1] > 1 and ids[0, 0].item() != 151643  # Qwen3 adds no BOS
    assert reloaded.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


@pytest.mark.slow  # three training processes: 25-70 s on 2 shared CPU cores
def test_qwen3_moe_kill_9_and_resume_reproduces_the_uninterrupted_run(qwen3_config, tmp_path):
    cfg = qwen3_config(steps=20)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    proc = _run_cli(cfg, f"--run_dir={whole}")
    assert proc.wait(timeout=300) == 0, proc.stdout.read()

    proc = _run_cli(cfg, f"--run_dir={cut}")
    _wait_for_step(cut, proc, random.Random(os.getpid()).randint(5, 13))  # after the step-4 checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert losses(cut)[-1][0] < 20, "the run ended before it could be killed"
    proc = _run_cli(cfg, f"--run_dir={cut}")
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    assert "resumed from" in out

    assert losses(cut) == losses(whole)  # the same trace, each step once
    a, b = final_weights(whole), final_weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(".mlp.gate_proj." in k for k in a) and any(".moe.experts." in k for k in a)


def test_qwen3_recipe_and_config_continue_qwen3_in_its_pretraining_regime(capsys):
    from moecpt.cli import main
    from moecpt.pipeline.recipe import load_recipe

    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(repo / "configs" / "qwen3-moe-30b-a3b.toml")
    recipe = load_recipe(repo / "recipes" / "qwen3-moe-30b-a3b.toml")
    shards = {name: [f"shards/{name}"] for name in ("ja", "en", "code")}  # the corpora a user points it at
    cpt = recipe.stage_config("cpt", shards, init_from=recipe.cpt["init_from"])
    for c in (cfg, cpt):
        assert c.model.preset == "qwen3-moe-30b-a3b" and "Qwen3-30B-A3B" in c.init_from
        assert c.model.overrides == {"router_aux_loss_coef": 0.001, "router_balance_scope": "global"}
        assert c.data.tokenizer == str(Path(c.init_from) / "tokenizer.json")
        assert c.data.mixture == "0.644 ja 0.256 en 0.1 code"
        o, t = c.optimizer, c.training
        assert (o.lr, o.min_lr, t.steps, t.global_batch, c.data.seq_len, t.dtype) == (
            2e-5, 2e-6, 25000, 1024, 4096, "bfloat16")
    # Without the weights here, `moecpt plan` falls back to the preset: the 30.5B-parameter Qwen3-30B-A3B.
    for gpus in (8, 64):
        assert main(["plan", "--config", str(repo / "configs" / "qwen3-moe-30b-a3b.toml"), "--gpus", str(gpus),
                     "--gpu-memory", "80GB"]) == 0
        out = capsys.readouterr().out
        assert "using model.preset 'qwen3-moe-30b-a3b'" in out
        assert "30.53B parameters, 48 layers, 128 experts (top-8)" in out and "suggested:" in out
