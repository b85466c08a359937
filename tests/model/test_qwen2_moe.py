"""moecpt's Qwen2-MoE against transformers' on random tiny checkpoints of several shapes (dense layers among
the MoE ones, sliding-window layers, tied and untied embeddings, top-k renormalised or not, with and without
qkv bias): logits, losses, routing, gradients, generation, both weight layouts, export, strict loading; and
the config read from and written to config.json."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import moecpt
from moecpt.errors import UserError
from moecpt.model.auto import build_model
from moecpt.model.families import preset_config
from moecpt.model.families.qwen2_moe import Qwen2MoeConfig

transformers = pytest.importorskip("transformers")

from .parity import (  # noqa: E402
    assert_missing_tensor_refused,
    compare_forward,
    compare_generation,
    compare_gradients,
    compare_left_padding,
    fused_name,
    random_ids,
    save_perturbed,
)

TOL = 1e-5
VOCAB = 128

SHAPES = {
    # name: transformers Qwen2MoeConfig fields beyond the base ones below
    "dense-middle-gqa": dict(mlp_only_layers=[1]),
    "sparse-step2-mha-tied-norm": dict(decoder_sparse_step=2, num_key_value_heads=4, tie_word_embeddings=True,
                                       norm_topk_prob=True),
    "sliding-mqa-top1": dict(use_sliding_window=True, sliding_window=5, max_window_layers=3, num_key_value_heads=1,
                             num_experts_per_tok=1),
    "no-qkv-bias-tied-e4": dict(qkv_bias=False, tie_word_embeddings=True, num_experts=4, norm_topk_prob=True),
}


def hf_config(**kw):
    args = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, moe_intermediate_size=24,
                shared_expert_intermediate_size=36, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, max_position_embeddings=128,
                router_aux_loss_coef=0.02, output_router_logits=True, pad_token_id=0)
    return transformers.Qwen2MoeConfig(**(args | kw))


def make_hf_model(path, seed: int = 0, **kw):
    """A random transformers Qwen2-MoE saved to `path` (norms and biases perturbed), in eval mode."""
    return save_perturbed(transformers.Qwen2MoeForCausalLM, hf_config(**kw), path, seed)


def ids_of(shape, seed):
    return random_ids(shape, seed, VOCAB)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_logits_losses_and_routing_match_transformers(tmp_path, monkeypatch, shape):
    kw = SHAPES[shape]
    hf = make_hf_model(tmp_path, **kw)
    model = moecpt.from_pretrained(tmp_path, dtype=torch.float32).eval()
    c = model.config
    assert isinstance(c, Qwen2MoeConfig) and c.tie_word_embeddings == kw.get("tie_word_embeddings", False)
    sparse = [i for i, layer in enumerate(model.layers) if hasattr(layer, "moe")]
    assert sparse == c.sparse_layers == [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "gate")]
    assert [layer.self_attn.window for layer in model.layers] == [
        getattr(layer.self_attn, "sliding_window", None) for layer in hf.model.layers]
    ids = ids_of((3, 24), 1)

    theirs, _ = compare_forward(hf, model, ids, monkeypatch, TOL)
    assert len(theirs.router_logits) == len(sparse)


def test_sliding_window_layers_change_the_result(tmp_path):
    """The window parity above is not vacuous: the same weights attending fully give other logits."""
    make_hf_model(tmp_path, **SHAPES["sliding-mqa-top1"])
    model = moecpt.from_pretrained(tmp_path).eval()
    assert [layer.self_attn.window for layer in model.layers] == [5, None, 5]
    ids = ids_of((2, 20), 2)
    with torch.no_grad():
        windowed = model(ids).logits
        for layer in model.layers:
            layer.self_attn.window = None
        full = model(ids).logits
    assert torch.equal(windowed[:, :5], full[:, :5])
    assert (windowed[:, 5:] - full[:, 5:]).abs().max().item() > 1e-3


def test_left_padding_matches_transformers_and_is_excluded_from_statistics(tmp_path):
    hf = make_hf_model(tmp_path, mlp_only_layers=[1])
    model = moecpt.from_pretrained(tmp_path).eval()
    ids = ids_of((3, 20), 3)
    ours, real = compare_left_padding(hf, model, ids, TOL)
    assert ours.expert_counts.sum(dim=1).tolist() == [real.sum().item() * 2] * 2  # two MoE layers, top-2


@pytest.mark.parametrize("shape", ["dense-middle-gqa", "no-qkv-bias-tied-e4"])
def test_every_gradient_matches_transformers(tmp_path, shape):
    hf = make_hf_model(tmp_path, **SHAPES[shape])
    compare_gradients(hf, moecpt.from_pretrained(tmp_path), ids_of((2, 16), 4), fused_name, TOL)


def test_greedy_generation_with_left_padding_matches_transformers(tmp_path):
    hf = make_hf_model(tmp_path, **SHAPES["sliding-mqa-top1"])
    compare_generation(hf, moecpt.from_pretrained(tmp_path), ids_of((3, 11), 5), {0: 4, 2: 2})


def test_transformers_saves_the_hub_layout_and_the_fused_layout_loads_too(tmp_path):
    hf = make_hf_model(tmp_path / "hub", mlp_only_layers=[1])
    hub_names = set(load_file(str(tmp_path / "hub" / "model.safetensors")))
    assert "model.layers.0.mlp.experts.7.gate_proj.weight" in hub_names
    assert {"model.layers.0.mlp.shared_expert.up_proj.weight", "model.layers.0.mlp.shared_expert_gate.weight",
            "model.layers.1.mlp.down_proj.weight", "model.layers.2.self_attn.q_proj.bias"} <= hub_names
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((tmp_path / "hub" / "config.json").read_text())
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.2.mlp.experts.gate_up_proj" in state
    save_file(state, str(fused / "model.safetensors"))
    ids = ids_of((2, 12), 6)
    with torch.no_grad():
        expected = hf(ids).logits
        for d in ("hub", "fused"):
            assert (moecpt.from_pretrained(tmp_path / d).eval()(ids).logits - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("shape,shard_size", [("sliding-mqa-top1", "5GB"), ("no-qkv-bias-tied-e4", "30KB")])
def test_export_round_trips_through_transformers(tmp_path, shape, shard_size):
    make_hf_model(tmp_path / "src", **SHAPES[shape])
    model = moecpt.from_pretrained(tmp_path / "src").eval()
    model.save_pretrained(tmp_path / "out", max_shard_size=shard_size)
    assert (len(list((tmp_path / "out").glob("*.safetensors"))) > 1) == (shard_size == "30KB")

    reloaded, info = transformers.Qwen2MoeForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert reloaded.config.architectures == ["Qwen2MoeForCausalLM"]
    assert reloaded.config.layer_types == list(model.config.attention_types)
    assert reloaded.config.qkv_bias == model.config.qkv_bias
    ids = ids_of((2, 12), 7)
    with torch.no_grad():
        assert (reloaded.eval()(ids).logits - model(ids).logits).abs().max().item() <= TOL
    again = moecpt.from_pretrained(tmp_path / "out")
    assert again.config == model.config
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)


@pytest.mark.parametrize("layout", ["hub", "fused"])
def test_a_checkpoint_missing_an_expert_tensor_is_refused_naming_it(tmp_path, layout):
    hf = make_hf_model(tmp_path, mlp_only_layers=[1])
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path)) if layout == "hub" else {k: v.contiguous() for k, v in hf.state_dict().items()}
    victim = ("model.layers.2.mlp.experts.5.up_proj.weight" if layout == "hub"
              else "model.layers.2.mlp.experts.down_proj")
    assert_missing_tensor_refused(tmp_path, tensors, victim)


def test_a_checkpoint_missing_the_shared_expert_gate_is_refused(tmp_path):
    make_hf_model(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.0.mlp.shared_expert_gate.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match=r"missing \(1\): model\.layers\.0\.mlp\.shared_expert_gate\.weight"):
        moecpt.from_pretrained(tmp_path)


def test_config_reads_both_transformers_spellings():
    v4 = {"model_type": "qwen2_moe", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": None, "vocab_size": 64, "rope_theta": 1e6, "sliding_window": None,
          "use_sliding_window": False, "mlp_only_layers": None, "eos_token_id": [3, 4]}
    v5 = {**{k: v for k, v in v4.items() if k != "rope_theta"}, "sliding_window": 0, "mlp_only_layers": [],
          "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
          "layer_types": ["full_attention"] * 2}
    a, b = Qwen2MoeConfig.from_hf_dict(v4), Qwen2MoeConfig.from_hf_dict(v5)
    assert a.rope_theta == b.rope_theta == 1e6 and a.num_key_value_heads == 4 and a.eos_token_id == 3
    assert a.attention_types == b.attention_types == ("full_attention",) * 2
    d = b.to_hf_dict()
    assert d["layer_types"] == ["full_attention"] * 2 and d["rope_parameters"]["rope_theta"] == 1e6
    assert Qwen2MoeConfig.from_hf_dict(json.loads(json.dumps(d))) == b


@pytest.mark.parametrize("layers,max_window_layers", [(5, 3), (6, 28), (4, 0)])
def test_sliding_layers_without_layer_types_follow_transformers(layers, max_window_layers):
    """A config.json without layer_types (transformers 4.x wrote none) gets transformers 5's derivation."""
    kw = dict(num_hidden_layers=layers, use_sliding_window=True, sliding_window=7, max_window_layers=max_window_layers)
    d = {"model_type": "qwen2_moe", "hidden_size": 32, "num_attention_heads": 4, "vocab_size": 64} | kw
    ours = Qwen2MoeConfig.from_hf_dict(d)
    assert list(ours.attention_types) == hf_config(**kw).layer_types
    assert [ours.window(i) for i in range(layers)] == [7 if t == "sliding_attention" else None
                                                       for t in hf_config(**kw).layer_types]


@pytest.mark.parametrize("change,field", [
    (dict(mlp_only_layers=[0, 1]), "no MoE layer"),
    (dict(mlp_only_layers=[5]), "mlp_only_layers"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(layer_types=["full_attention"]), "layer_types"),
    (dict(layer_types=["sliding_attention", "full_attention"]), "use_sliding_window"),
    (dict(use_sliding_window=True, sliding_window=0), "sliding_window"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(head_dim=16), "head_dim"),
])
def test_invalid_configs_are_refused_naming_the_field(change, field):
    base = {"model_type": "qwen2_moe", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 64, "num_experts": 8}
    with pytest.raises(UserError, match=field):
        Qwen2MoeConfig.from_hf_dict(base | change)


def test_presets():
    real = preset_config("qwen2-moe-a2.7b")
    model = build_model(real)  # on the meta device
    # Qwen1.5-MoE-A2.7B: 14.3B parameters, 2.7B active (its model card).
    assert round(model.num_params() / 1e9, 1) == 14.3 and round(model.num_params(active=True) / 1e9, 1) == 2.7
    assert real.sparse_layers == list(range(24)) and real.attention_types == ("full_attention",) * 24
    assert (real.router_aux_loss_coef, real.router_balance_scope) == (0.001, "micro_batch")
    tiny = preset_config("qwen2-moe-tiny", num_experts=4)
    assert tiny.sparse_layers == [0, 2] and dataclasses.replace(tiny).num_experts == 4
