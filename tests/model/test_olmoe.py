"""moecpt's OLMoE against transformers' on random tiny checkpoints of several shapes (clip_qkv on and off,
attention biases, tied and untied embeddings, top-k renormalised or not, MHA/GQA/MQA): logits, losses (the
load-balancing loss as transformers computes it, plus the router z-loss it does not), routing, gradients,
generation, both weight layouts, export, strict loading; and the config read from and written to config.json."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import moecpt
from moecpt.errors import UserError
from moecpt.model.auto import build_model
from moecpt.model.families import preset_config
from moecpt.model.families.olmoe import OlmoeConfig

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
    # name: transformers OlmoeConfig fields beyond the base ones below
    "clip-gqa": dict(clip_qkv=0.3),
    "noclip-mha-tied-norm": dict(num_key_value_heads=4, tie_word_embeddings=True, norm_topk_prob=True),
    "bias-clip-mqa-top1": dict(attention_bias=True, clip_qkv=0.5, num_key_value_heads=1, num_experts_per_tok=1),
    "e16-top4-tied": dict(num_experts=16, num_experts_per_tok=4, tie_word_embeddings=True),
}


def hf_config(**kw):
    args = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, max_position_embeddings=128,
                router_aux_loss_coef=0.02, output_router_logits=True, pad_token_id=0, eos_token_id=2)
    return transformers.OlmoeConfig(**(args | kw))


def make_hf_model(path, seed: int = 0, **kw):
    """A random transformers OLMoE saved to `path` (norms and biases perturbed), in eval mode."""
    return save_perturbed(transformers.OlmoeForCausalLM, hf_config(**kw), path, seed)


def ids_of(shape, seed):
    return random_ids(shape, seed, VOCAB)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_logits_losses_and_routing_match_transformers(tmp_path, monkeypatch, shape):
    kw = SHAPES[shape]
    hf = make_hf_model(tmp_path, **kw)
    model = moecpt.from_pretrained(tmp_path, dtype=torch.float32).eval()
    c = model.config
    assert isinstance(c, OlmoeConfig) and c.clip_qkv == kw.get("clip_qkv")
    assert c.tie_word_embeddings == kw.get("tie_word_embeddings", False)
    ids = ids_of((3, 24), 1)

    theirs, ours = compare_forward(hf, model, ids, monkeypatch, TOL)
    # The router z-loss transformers does not compute: the mean over tokens and layers of logsumexp^2.
    z = torch.stack([lg.float().logsumexp(-1).square().mean() for lg in theirs.router_logits]).mean()
    assert ours.z_loss.item() == pytest.approx(z.item(), rel=1e-5)


def test_clip_qkv_clamps_after_the_norms(tmp_path):
    """The clip parity above is not vacuous: at clip_qkv 0.3 the clamp changes the result."""
    make_hf_model(tmp_path, **SHAPES["clip-gqa"])
    model = moecpt.from_pretrained(tmp_path).eval()
    ids = ids_of((2, 16), 2)
    with torch.no_grad():
        q, _, _ = model.layers[0].self_attn.project(model.layers[0].input_layernorm(model.embed_tokens(ids)))
        clipped = model(ids).logits
        for layer in model.layers:
            layer.self_attn.clip_qkv = None
        free = model(ids).logits
    assert q.abs().max().item() == pytest.approx(0.3)
    assert (clipped - free).abs().max().item() > 1e-3


def test_the_router_z_loss_enters_the_training_loss(tmp_path):
    hf = make_hf_model(tmp_path)
    model = moecpt.from_pretrained(tmp_path).eval()
    assert model.config.router_z_loss_coef == 0.0  # not a transformers field: moecpt's own setting
    model.loss_fn.z_coef = 0.001
    ids = ids_of((2, 16), 3)
    with torch.no_grad():
        theirs = hf(ids, labels=ids, output_router_logits=True)
        ours = model(ids, labels=ids)
    assert ours.z_loss.item() > 0
    assert ours.loss.item() == pytest.approx(theirs.loss.item() + 0.001 * ours.z_loss.item(), abs=1e-5)


def test_left_padding_matches_transformers_and_is_excluded_from_statistics(tmp_path):
    hf = make_hf_model(tmp_path, clip_qkv=0.5)
    model = moecpt.from_pretrained(tmp_path).eval()
    ids = ids_of((3, 20), 4)
    ours, real = compare_left_padding(hf, model, ids, TOL)
    assert ours.expert_counts.sum(dim=1).tolist() == [real.sum().item() * 2] * 2


@pytest.mark.parametrize("shape", ["clip-gqa", "bias-clip-mqa-top1", "noclip-mha-tied-norm"])
def test_every_gradient_matches_transformers(tmp_path, shape):
    hf = make_hf_model(tmp_path, **SHAPES[shape])
    compare_gradients(hf, moecpt.from_pretrained(tmp_path), ids_of((2, 16), 5), fused_name, TOL)


def test_greedy_generation_with_left_padding_matches_transformers(tmp_path):
    hf = make_hf_model(tmp_path, **SHAPES["bias-clip-mqa-top1"])
    compare_generation(hf, moecpt.from_pretrained(tmp_path), ids_of((3, 11), 6), {0: 4, 2: 2})


def test_transformers_saves_the_hub_layout_and_the_fused_layout_loads_too(tmp_path):
    hf = make_hf_model(tmp_path / "hub", clip_qkv=0.3)
    hub_names = set(load_file(str(tmp_path / "hub" / "model.safetensors")))
    assert {"model.layers.1.mlp.experts.7.down_proj.weight", "model.layers.0.mlp.gate.weight",
            "model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"} <= hub_names
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((tmp_path / "hub" / "config.json").read_text())
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    save_file(state, str(fused / "model.safetensors"))
    ids = ids_of((2, 12), 7)
    with torch.no_grad():
        expected = hf(ids).logits
        for d in ("hub", "fused"):
            assert (moecpt.from_pretrained(tmp_path / d).eval()(ids).logits - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("shape,shard_size", [("bias-clip-mqa-top1", "5GB"), ("e16-top4-tied", "30KB")])
def test_export_round_trips_through_transformers(tmp_path, shape, shard_size):
    make_hf_model(tmp_path / "src", **SHAPES[shape])
    model = moecpt.from_pretrained(tmp_path / "src").eval()
    model.save_pretrained(tmp_path / "out", max_shard_size=shard_size)
    assert (len(list((tmp_path / "out").glob("*.safetensors"))) > 1) == (shard_size == "30KB")

    reloaded, info = transformers.OlmoeForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert reloaded.config.architectures == ["OlmoeForCausalLM"]
    assert (reloaded.config.clip_qkv, reloaded.config.attention_bias) == (model.config.clip_qkv,
                                                                          model.config.attention_bias)
    ids = ids_of((2, 12), 8)
    with torch.no_grad():
        assert (reloaded.eval()(ids).logits - model(ids).logits).abs().max().item() <= TOL
    again = moecpt.from_pretrained(tmp_path / "out")
    assert again.config == model.config
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)


@pytest.mark.parametrize("layout", ["hub", "fused"])
def test_a_checkpoint_missing_an_expert_tensor_is_refused_naming_it(tmp_path, layout):
    hf = make_hf_model(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path)) if layout == "hub" else {k: v.contiguous() for k, v in hf.state_dict().items()}
    victim = ("model.layers.1.mlp.experts.6.gate_proj.weight" if layout == "hub"
              else "model.layers.0.mlp.experts.gate_up_proj")
    assert_missing_tensor_refused(tmp_path, tensors, victim)


def test_a_checkpoint_missing_a_qk_norm_is_refused(tmp_path):
    make_hf_model(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match=r"missing \(1\): model\.layers\.1\.self_attn\.k_norm\.weight"):
        moecpt.from_pretrained(tmp_path)


def test_config_reads_both_transformers_spellings():
    v4 = {"model_type": "olmoe", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": None, "vocab_size": 64, "num_experts": 8, "rope_theta": 5e5, "rope_scaling": None,
          "clip_qkv": 8.0}
    v5 = {**{k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling", "num_experts")},
          "num_local_experts": 8, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    a, b = OlmoeConfig.from_hf_dict(v4), OlmoeConfig.from_hf_dict(v5)
    assert a == b and a.rope_theta == 5e5 and a.num_key_value_heads == 4 and a.clip_qkv == 8.0
    assert (a.pad_token_id, a.eos_token_id, a.bos_token_id) == (1, 50279, None)  # transformers' defaults
    d = a.to_hf_dict()
    assert d["rope_parameters"]["rope_theta"] == 5e5 and "router_z_loss_coef" not in d
    assert OlmoeConfig.from_hf_dict(json.loads(json.dumps(d))) == a


@pytest.mark.parametrize("change,field", [
    (dict(clip_qkv=0), "clip_qkv"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(hidden_size=36), "hidden_size"),
    (dict(head_dim=16), "head_dim"),
    (dict(attention_dropout=0.1), "attention_dropout"),
    (dict(model_type="qwen2_moe"), "model_type"),
])
def test_invalid_configs_are_refused_naming_the_field(change, field):
    base = {"model_type": "olmoe", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 64, "num_experts": 8}
    with pytest.raises(UserError, match=field):
        OlmoeConfig.from_hf_dict(base | change)


def test_presets():
    real = preset_config("olmoe-1b-7b")
    model = build_model(real)  # on the meta device
    # OLMoE-1B-7B: 6.9B parameters, 1.3B active (the OLMoE paper).
    assert round(model.num_params() / 1e9, 1) == 6.9 and round(model.num_params(active=True) / 1e9, 1) == 1.3
    # MegaBlocks' 0.01 over top_k x T assignments is 0.01 / top_k in transformers' normalisation.
    assert real.router_aux_loss_coef * real.num_experts_per_tok == pytest.approx(0.01)
    assert (real.router_z_loss_coef, real.router_balance_scope) == (0.001, "micro_batch")
    assert model.loss_fn.z_coef == 0.001
    assert preset_config("olmoe-tiny").n_experts == 16
