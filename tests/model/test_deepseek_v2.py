"""moecpt's DeepSeek-V2 against transformers' on random tiny checkpoints (greedy and group-limited greedy
routing, low-rank queries or not, YaRN): logits, loss, routing per token, gradients, generation, export; and
V2's config fields."""

from __future__ import annotations

import pytest
import torch

import moecpt
from moecpt.errors import UserError
from moecpt.model.auto import build_model
from moecpt.model.families import preset_config
from moecpt.model.families.deepseek_v2 import DeepseekV2Config

transformers = pytest.importorskip("transformers")

from .parity import capture_routing, compare_generation, compare_gradients, random_ids, save_perturbed  # noqa: E402
from .test_deepseek_v3 import fused_name, hf_routing  # noqa: E402

TOL = 1e-5
VOCAB = 128
YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32, mscale=0.707, mscale_all_dim=0.707)

SHAPES = {
    # 3 of the 4 experts of 1 of 2 groups: with a group scored by its best expert, the limit binds only when a
    # token takes more experts than the groups it may use (with top-2 of 2 groups it never changes a choice)
    "group-limited-qlora-yarn": dict(topk_method="group_limited_greedy", n_group=2, topk_group=1,
                                     num_experts_per_tok=3, rope_parameters=YARN),
    "greedy-no-qlora-scaled": dict(q_lora_rank=None, routed_scaling_factor=1.5, first_k_dense_replace=0),
}


def hf_config(**kw):
    args = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                first_k_dense_replace=1, n_shared_experts=2, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                qk_nope_head_dim=8, v_head_dim=12, max_position_embeddings=128, pad_token_id=0)
    return transformers.DeepseekV2Config(**(args | kw))


def load(path):
    """The checkpoint in moecpt, its load-balancing loss weight set to 0 (transformers computes none)."""
    model = moecpt.from_pretrained(path)
    assert model.loss_fn.aux_coef == 0.001 / 6 and model.config.router_balance_scope == "sequence"
    model.loss_fn.aux_coef = 0.0
    return model


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_logits_loss_and_routing_match_transformers(tmp_path, monkeypatch, shape):
    hf = save_perturbed(transformers.DeepseekV2ForCausalLM, hf_config(**SHAPES[shape]), tmp_path)
    model = load(tmp_path).eval()
    assert isinstance(model.config, DeepseekV2Config)
    theirs_routing, ours_routing = hf_routing(hf), capture_routing(monkeypatch)
    ids = random_ids((3, 24), 1, VOCAB)
    with torch.no_grad():
        theirs, ours = hf(ids, labels=ids), model(ids, labels=ids)
    assert (theirs.logits - ours.logits).abs().max().item() <= TOL
    assert ours.loss.item() == pytest.approx(theirs.loss.item(), abs=1e-6)
    assert len(theirs_routing) == len(ours_routing) == len(model.config.sparse_layers)
    for a, b in zip(theirs_routing, ours_routing, strict=True):
        assert torch.equal(a.sort(-1).values, b.sort(-1).values)


def test_the_group_limit_steers_the_routing(tmp_path, monkeypatch):
    """The routing parity above is not vacuous: without the group limit other experts win."""
    save_perturbed(transformers.DeepseekV2ForCausalLM, hf_config(**SHAPES["group-limited-qlora-yarn"]), tmp_path)
    model = load(tmp_path).eval()
    routing = capture_routing(monkeypatch)
    gate = model.layers[1].moe.gate
    ids = random_ids((2, 24), 2, VOCAB)
    with torch.no_grad():
        model(ids)
        gate.n_group = 1
        model(ids)
    grouped, ungrouped = routing[0], routing[2]
    assert not torch.equal(grouped.sort(-1).values, ungrouped.sort(-1).values)
    assert all(len(set(row)) == 1 for row in (grouped // 4).tolist())  # every token within one group of 4


def test_gradients_and_generation_match_transformers(tmp_path):
    hf = save_perturbed(transformers.DeepseekV2ForCausalLM, hf_config(**SHAPES["group-limited-qlora-yarn"]), tmp_path)
    compare_gradients(hf, load(tmp_path), random_ids((2, 32), 4, VOCAB), fused_name, TOL)
    compare_generation(hf, load(tmp_path), random_ids((2, 9), 5, VOCAB), {1: 3}, new_tokens=8)


def test_export_round_trips_through_transformers(tmp_path):
    hf = save_perturbed(transformers.DeepseekV2ForCausalLM, hf_config(**SHAPES["greedy-no-qlora-scaled"]), tmp_path / "src")
    model = moecpt.from_pretrained(tmp_path / "src").eval()
    model.save_pretrained(tmp_path / "out")
    reloaded, info = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = random_ids((2, 12), 7, VOCAB)
    with torch.no_grad():
        assert (reloaded.eval()(ids).logits - hf(ids).logits).abs().max().item() <= TOL
    assert moecpt.from_pretrained(tmp_path / "out").config == model.config


@pytest.mark.parametrize("change,field", [
    (dict(norm_topk_prob=True), "norm_topk_prob"),
    (dict(topk_method="noaux_tc"), "topk_method"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(scoring_func="sigmoid"), "scoring_func"),
    (dict(topk_method="group_limited_greedy", n_group=3, topk_group=1), "n_group"),
])
def test_invalid_configs_are_refused_naming_the_field(change, field):
    base = {"model_type": "deepseek_v2", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 64, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": None, "topk_group": None}
    assert DeepseekV2Config.from_hf_dict(base).n_group == 1
    with pytest.raises(UserError, match=field):
        DeepseekV2Config.from_hf_dict(base | change)


def test_lite_preset():
    model = build_model(preset_config("deepseek-v2-lite-16b"))  # on the meta device
    assert round(model.num_params() / 1e9, 1) == 15.7  # DeepSeek-V2-Lite: 15.7B parameters
    assert not hasattr(model, "mtp") and not hasattr(model.layers[1].moe.gate, "e_score_correction_bias")


def test_aux_loss_alpha_of_a_deepseek_config_is_read_in_moecpts_normalisation():
    """DeepSeek's sequence-wise loss with alpha equals moecpt's (transformers') normalisation with alpha / top-k;
    a config.json that carries aux_loss_alpha (the hub's do, transformers' own do not) is read that way."""
    from moecpt.model.families.deepseek_v2 import DeepseekV2Config

    base = DeepseekV2Config.from_preset("deepseek-v2-tiny").to_hf_dict()
    base.pop("router_aux_loss_coef")
    assert DeepseekV2Config.from_hf_dict(base | {"aux_loss_alpha": 0.003, "num_experts_per_tok": 3, "topk_group": 4}) \
        .router_aux_loss_coef == pytest.approx(0.001)
    assert DeepseekV2Config.from_hf_dict(base).router_aux_loss_coef == pytest.approx(0.001 / 6)
