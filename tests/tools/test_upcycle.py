"""`moecpt upcycle`: a dense Llama, Mistral or Qwen3 becomes a Mixtral or Qwen3-MoE with the same logits (fp32,
1e-5, in transformers and in moecpt), by copies and by virtual groups; impossible combinations are refused with
the reason. That the upcycled model trains and exports is tested with the recipe step
(tests/pipeline/test_cpt_steps.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import moecpt
from moecpt.cli import main
from moecpt.errors import UserError
from moecpt.tools import upcycle as up
from moecpt.tools.upcycle import expert_plan, upcycle

from .dense_models import make_dense

transformers = pytest.importorskip("transformers")

MOE_CLS = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
DENSE = {  # name: (kind, config changes)
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "mistral-window": ("mistral", {"sliding_window": 8}),
    "qwen3": ("qwen3", {}),
    "qwen3-bias-tied-window": ("qwen3", {"attention_bias": True, "tie_word_embeddings": True,
                                         "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0}),
}


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """name -> (directory, transformers model, logits of a fixed batch), made once per module."""
    root = tmp_path_factory.mktemp("dense")
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    out = {}
    for name, (kind, kw) in DENSE.items():
        model = make_dense(kind, root / name, **kw)
        with torch.no_grad():
            out[name] = (root / name, model, model(ids).logits)
    return out, ids


def _logits_both_ways(path: Path, family: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hf_model = getattr(transformers, MOE_CLS[family]).from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf_model(ids).logits, moecpt.from_pretrained(path)(ids).logits


CASES = [  # dense, family, experts, top_k, granularity, norm_topk_prob
    ("llama", "mixtral", 4, 2, 1, True),  # copies
    ("llama", "mixtral", 8, 2, 2, True),  # virtual groups of 2 half-MLPs, scale 2
    ("llama-tied", "mixtral", 6, 3, 2, True),  # top_k 3 not a multiple of G=2: groups of S=3, scales 1.5 and 3
    ("mistral-window", "mixtral", 8, 4, 4, True),  # quarter-MLPs, the sliding window kept
    ("qwen3", "qwen3_moe", 4, 2, 1, True),
    ("qwen3-bias-tied-window", "qwen3_moe", 8, 4, 2, True),
    ("qwen3", "qwen3_moe", 4, 4, 2, False),  # not renormalised: exact when every expert is selected
]


@pytest.mark.parametrize(("name", "family", "E", "K", "G", "norm"), CASES)
def test_upcycled_logits_equal_the_dense_models(dense, tmp_path, name, family, E, K, G, norm):
    (models, ids) = dense
    path, _, want = models[name]
    out = upcycle(path, tmp_path / "moe", family=family, experts=E, top_k=K, granularity=G, norm_topk_prob=norm)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and config["num_experts_per_tok"] == K
    hf_logits, ours = _logits_both_ways(out, family, ids)
    assert (hf_logits - want).abs().max() < 1e-5
    assert (ours - want).abs().max() < 1e-5
    # the router is random, shared within each virtual group of S experts and different between groups
    S = json.loads((out / "upcycle.json").read_text())["group"]
    router = moecpt.from_pretrained(out).layers[0].moe.gate.weight.detach()
    groups = router.view(E // S, S, -1)
    assert torch.equal(groups, groups[:, :1].expand_as(groups)) and router.abs().max() > 0
    assert E // S == 1 or not torch.equal(groups[0, 0], groups[1, 0])


def test_without_the_weight_scaling_the_function_changes(dense, tmp_path, monkeypatch):
    """The scale is what keeps virtual groups exact: with unit scales the logits move."""
    (models, ids) = dense
    path, _, want = models["llama"]
    plan = expert_plan(8, 2, 2)
    assert plan.group == 2 and plan.shard == (0, 1) * 4 and plan.scale == (2.0,) * 8
    monkeypatch.setattr(up, "expert_plan", lambda *a, **k: dataclasses.replace(plan, scale=(1.0,) * 8))
    out = upcycle(path, tmp_path / "unscaled", experts=8, top_k=2, granularity=2)
    _, ours = _logits_both_ways(out, "mixtral", ids)
    assert (ours - want).abs().max() > 1e-3


def test_the_exact_rule():
    assert expert_plan(6, 3, 2) == up.ExpertPlan(6, 3, 2, 3, (0, 1, 0, 0, 1, 0), (1.5, 3.0, 1.5, 1.5, 3.0, 1.5))
    assert expert_plan(8, 2, 1).group == 1 and set(expert_plan(8, 2, 1).scale) == {1.0}
    assert expert_plan(64, 8, 8).group == 8 and set(expert_plan(64, 8, 8).scale) == {8.0}
    with pytest.raises(UserError, match="group size S >= 2 dividing both top_k and experts"):
        expert_plan(8, 3, 2)  # gcd(3, 8) = 1
    with pytest.raises(UserError, match="not renormalised .* top_k=2 < experts=8"):
        expert_plan(8, 2, 2, renormalised=False)


def test_refusals_name_the_feature(dense, tmp_path):
    (models, _) = dense
    llama, qwen3 = models["llama"][0], models["qwen3"][0]
    with pytest.raises(UserError, match="qwen3_moe always normalises q and k"):
        upcycle(llama, tmp_path / "x", family="qwen3_moe", experts=4, top_k=2)
    with pytest.raises(UserError, match="qwen3 normalises q and k per head .* into qwen3_moe"):
        upcycle(qwen3, tmp_path / "x", family="mixtral", experts=4, top_k=2)
    with pytest.raises(UserError, match="shared_experts = 1: neither mixtral nor qwen3_moe"):
        upcycle(llama, tmp_path / "x", experts=4, top_k=2, shared_experts=1)
    with pytest.raises(UserError, match="intermediate_size 96 is not divisible by granularity 5"):
        upcycle(llama, tmp_path / "x", experts=5, top_k=5, granularity=5)
    with pytest.raises(UserError, match="mixtral always renormalises"):
        upcycle(llama, tmp_path / "x", experts=4, top_k=4, norm_topk_prob=False)
    for key, value, match in (("attention_bias", True, "attention_bias = true: mixtral's attention has no biases"),
                              ("mlp_bias", True, "mlp_bias = true"),
                              ("model_type", "gpt2", "model_type is 'gpt2'; moecpt upcycles dense llama")):
        bad = tmp_path / key
        bad.mkdir()
        cfg = json.loads((llama / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(UserError, match=match):
            upcycle(bad, tmp_path / "x", experts=4, top_k=2)
    partial = tmp_path / "partial"
    partial.mkdir()
    cfg = json.loads((qwen3 / "config.json").read_text())
    (partial / "config.json").write_text(json.dumps({**cfg, "use_sliding_window": True, "sliding_window": 8,
                                                      "max_window_layers": 1, "layer_types": None}))
    with pytest.raises(UserError, match="layers 1.. attend within a sliding window"):
        upcycle(partial, tmp_path / "x", family="qwen3_moe", experts=4, top_k=2)
    assert not (tmp_path / "x").exists()  # nothing written by a refused upcycle


def test_cli_upcycles_and_refuses(dense, tmp_path, capsys):
    (models, _) = dense
    llama = str(models["llama"][0])
    assert main(["upcycle", llama, str(tmp_path / "m"), "--experts", "4", "--top-k", "2", "--seed", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["upcycled"] == str(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "upcycle.json").read_text())["seed"] == 3
    assert main(["upcycle", llama, str(tmp_path / "n"), "--experts", "8", "--top-k", "3", "--granularity", "2"]) == 2
    assert "no exact virtual-group initialisation" in capsys.readouterr().err
