"""moecpt's Qwen3-MoE against transformers' on random tiny checkpoints of several shapes (dense layers by
mlp_only_layers or decoder_sparse_step, tied and untied embeddings, norm_topk_prob on and off, GQA and MHA,
attention biases, a sliding window): logits, losses, routing, gradients, generation, both weight layouts,
export, strict loading, and the config in both transformers spellings."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

import moecpt
from moecpt.errors import UserError
from moecpt.model import build_model
from moecpt.model.families import family, preset_config
from moecpt.model.families.qwen3_moe import Qwen3MoeAdapter, Qwen3MoeConfig

transformers = pytest.importorskip("transformers")

from .parity import (  # noqa: E402
    assert_missing_tensor_refused,
    compare_forward,
    compare_generation,
    compare_gradients,
    compare_left_padding,
    save_perturbed,
)

TOL = 1e-5
VOCAB = 128

SHAPES = {
    # A dense first layer, GQA, renormalised top-k.
    "dense0-gqa-topknorm": dict(num_experts=8, num_experts_per_tok=2, num_key_value_heads=2, mlp_only_layers=[0],
                                norm_topk_prob=True),
    # Every second layer sparse (decoder_sparse_step 2), MHA, tied, top-k weights as they are.
    "step2-mha-tied": dict(num_experts=6, num_experts_per_tok=3, num_key_value_heads=4, decoder_sparse_step=2,
                           tie_word_embeddings=True, norm_topk_prob=False),
    # All MoE, one KV head, attention biases, head_dim not hidden / heads.
    "allmoe-kv1-bias": dict(num_experts=4, num_experts_per_tok=2, num_key_value_heads=1, head_dim=12,
                            attention_bias=True, norm_topk_prob=False),
    # A sliding window shorter than the sequence, tied, renormalised, both dense-layer rules at once.
    "window-tied": dict(num_experts=8, num_experts_per_tok=2, num_key_value_heads=2, use_sliding_window=True,
                        sliding_window=7, tie_word_embeddings=True, norm_topk_prob=True, mlp_only_layers=[2],
                        decoder_sparse_step=1),
}


def hf_config(**kw):
    args = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, moe_intermediate_size=24,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                num_experts_per_tok=2, max_position_embeddings=128, rope_parameters={"rope_type": "default",
                                                                                    "rope_theta": 10000.0},
                router_aux_loss_coef=0.01, output_router_logits=True, pad_token_id=0)
    args.update(kw)
    return transformers.Qwen3MoeConfig(**args)


def make_hf_model(path, seed: int = 0, **kw):
    """A random transformers Qwen3-MoE saved to `path` (norms and biases perturbed), in eval mode."""
    return save_perturbed(transformers.Qwen3MoeForCausalLM, hf_config(**kw), path, seed)


def hf_param_name(adapter: Qwen3MoeAdapter, name: str) -> str:
    """The transformers-5 (in-memory, fused) name of a moecpt parameter."""
    if ".experts." in name:
        return "model." + name.replace(".moe.", ".mlp.")
    return adapter.hf_name(name, "fused")


def ids_batch(seed: int, b: int = 3, t: int = 24) -> torch.Tensor:
    return torch.randint(1, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_logits_losses_and_routing_match_transformers(tmp_path, monkeypatch, shape):
    kw = SHAPES[shape]
    hf = make_hf_model(tmp_path, **kw)
    model = moecpt.from_pretrained(tmp_path, dtype=torch.float32).eval()
    c = model.config
    assert isinstance(c, Qwen3MoeConfig) and c.tie_word_embeddings == kw.get("tie_word_embeddings", False)
    sparse = [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts")]
    assert c.sparse_layers == sparse and 0 < len(sparse)
    ids = ids_batch(1)

    theirs, _ = compare_forward(hf, model, ids, monkeypatch, TOL)
    assert len(theirs.router_logits) == len(sparse)


@pytest.mark.parametrize("shape", ["dense0-gqa-topknorm", "step2-mha-tied", "allmoe-kv1-bias"])
def test_gradients_match_transformers(tmp_path, shape):
    hf = make_hf_model(tmp_path, **SHAPES[shape])
    model = moecpt.from_pretrained(tmp_path)
    adapter = Qwen3MoeAdapter(model.config)
    compare_gradients(hf, model, ids_batch(3, b=2, t=16), lambda n: hf_param_name(adapter, n), TOL)


def test_left_padding_matches_transformers_and_is_left_out_of_the_statistics(tmp_path):
    hf = make_hf_model(tmp_path, **SHAPES["dense0-gqa-topknorm"])
    model = moecpt.from_pretrained(tmp_path).eval()
    ids = ids_batch(2, t=20)
    ours, real = compare_left_padding(hf, model, ids, TOL)
    moe_layers = len(model.config.sparse_layers)
    assert ours.expert_counts.sum(dim=1).tolist() == [real.sum().item() * 2] * moe_layers


@pytest.mark.parametrize("shape", ["dense0-gqa-topknorm", "window-tied"])
def test_greedy_generation_matches_transformers_generate(tmp_path, shape):
    hf = make_hf_model(tmp_path, **SHAPES[shape])
    ids = torch.randint(3, VOCAB, (3, 15), generator=torch.Generator().manual_seed(6))
    compare_generation(hf, moecpt.from_pretrained(tmp_path), ids, {0: 6, 2: 2})


def test_windowed_kv_cache_decoding_gives_the_logits_of_the_full_forward(tmp_path):
    """Token-by-token decoding past the window (the KV cache with the sliding-window mask) against the full
    forward, which the parity test checks against transformers."""
    make_hf_model(tmp_path, **SHAPES["window-tied"])
    model = moecpt.from_pretrained(tmp_path).eval()
    assert model.config.window == 7
    ids = ids_batch(8, b=2, t=20)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 20, torch.float32, ids.device)
        steps = [model(ids[:, :5], cache=cache).logits]
        for t in range(5, 20):
            steps.append(model(ids[:, t:t + 1], position_ids=torch.full((2, 1), t), cache=cache).logits)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= TOL
    unwindowed = build_model(dataclasses.replace(model.config, use_sliding_window=False)).eval()
    unwindowed.load_state_dict(model.state_dict(), assign=True)
    with torch.no_grad():  # and the window matters here: without it the positions past it differ
        free = unwindowed(ids).logits
    assert torch.equal(free[:, :7], full[:, :7]) and (free[:, 7:] - full[:, 7:]).abs().max().item() > 1e-3


def test_fused_transformers5_layout_loads(tmp_path):
    hf = make_hf_model(tmp_path / "hub", **SHAPES["step2-mha-tied"])
    hub_names = set(load_file(str(tmp_path / "hub" / "model.safetensors")))
    assert "model.layers.1.mlp.experts.5.up_proj.weight" in hub_names  # transformers saves the hub layout
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((tmp_path / "hub" / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"},
              str(fused / "model.safetensors"))
    assert "model.layers.1.mlp.experts.gate_up_proj" in set(load_file(str(fused / "model.safetensors")))
    model = moecpt.from_pretrained(fused).eval()
    ids = ids_batch(4, b=2, t=12)
    with torch.no_grad():
        assert (hf(ids).logits - model(ids).logits).abs().max().item() <= TOL


@pytest.mark.parametrize("shard_size", ["5GB", "20KB"])
def test_export_round_trips_through_transformers(tmp_path, shard_size, caplog):
    make_hf_model(tmp_path / "src", **SHAPES["dense0-gqa-topknorm"])
    model = moecpt.from_pretrained(tmp_path / "src").eval()
    model.save_pretrained(tmp_path / "out", max_shard_size=shard_size)
    assert (len(list((tmp_path / "out").glob("*.safetensors"))) > 1) == (shard_size == "20KB")

    with caplog.at_level(logging.WARNING):
        reloaded, info = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "out",
                                                                           output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not [r for r in caplog.records if "config" in r.getMessage().lower()], caplog.text
    assert reloaded.config.architectures == ["Qwen3MoeForCausalLM"]
    assert reloaded.config.mlp_only_layers == [0] and reloaded.config.head_dim == 8
    ids = ids_batch(5, b=2, t=12)
    with torch.no_grad():
        assert (reloaded.eval()(ids).logits - model(ids).logits).abs().max().item() <= TOL
    again = moecpt.from_pretrained(tmp_path / "out")
    assert again.config == model.config
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)


def test_tied_export_keeps_the_tie(tmp_path):
    make_hf_model(tmp_path / "src", **SHAPES["step2-mha-tied"])
    model = moecpt.from_pretrained(tmp_path / "src")
    assert model.lm_head.weight is model.embed_tokens.weight
    model.save_pretrained(tmp_path / "out")
    reloaded, info = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("layout", ["hub", "fused"])
def test_a_missing_expert_tensor_is_refused_by_name(tmp_path, layout):
    hf = make_hf_model(tmp_path, **SHAPES["dense0-gqa-topknorm"])
    path = tmp_path / "model.safetensors"
    if layout == "hub":
        tensors = load_file(str(path))
        victim = "model.layers.2.mlp.experts.5.up_proj.weight"
    else:
        tensors = {k: v.contiguous() for k, v in hf.state_dict().items()}
        victim = "model.layers.1.mlp.experts.down_proj"
    assert_missing_tensor_refused(tmp_path, tensors, victim)


def test_a_dense_layer_saved_as_moe_is_refused(tmp_path):
    make_hf_model(tmp_path, **SHAPES["dense0-gqa-topknorm"])
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["mlp_only_layers"] = []  # the file's layer 0 is dense: its experts are missing, its MLP unexpected
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight"):
        moecpt.from_pretrained(tmp_path)


# ---- the config ------------------------------------------------------------------------------------------
HUB_30B_A3B = {  # Qwen/Qwen3-30B-A3B config.json (transformers 4.51 spelling)
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
    "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
    "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}


def test_both_transformers_spellings_read_as_the_preset():
    preset = preset_config("qwen3-moe-30b-a3b")
    assert preset.router_balance_scope == "global" and preset.router_aux_loss_coef == 0.001
    v4 = Qwen3MoeConfig.from_hf_dict(HUB_30B_A3B)
    # transformers 5 writes num_local_experts and rope_parameters
    v5 = transformers.Qwen3MoeConfig(**{k: v for k, v in HUB_30B_A3B.items() if k not in ("rope_theta",
                                                                                         "rope_scaling")},
                                     rope_parameters={"rope_type": "default", "rope_theta": 1e6}).to_dict()
    assert "num_local_experts" in v5 and "num_experts" not in v5
    v5 = Qwen3MoeConfig.from_hf_dict(v5)
    assert v4 == v5 == preset  # the balancing regime comes with the family, not from config.json
    assert family("qwen3_moe").config_cls is Qwen3MoeConfig


@pytest.mark.parametrize("name", ["qwen3-moe-30b-a3b", "qwen3-moe-tiny"])
def test_exported_config_is_read_by_transformers_as_written(name):
    c = preset_config(name)
    d = c.to_hf_dict()
    theirs = transformers.Qwen3MoeConfig(**d)
    for key in ("hidden_size", "num_hidden_layers", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                "head_dim", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "sliding_window",
                "tie_word_embeddings", "router_aux_loss_coef"):
        assert getattr(theirs, key) == (list(c.mlp_only_layers) if key == "mlp_only_layers" else d[key]), key
    assert theirs.rope_parameters["rope_theta"] == c.rope_theta
    assert Qwen3MoeConfig.from_hf_dict(json.loads(json.dumps(d))) == c
    assert "router_balance_scope" not in d  # moecpt's settings are not written into config.json


@pytest.mark.parametrize("change, field", [
    ({"num_experts_per_tok": 9, "num_experts": 8}, "num_experts_per_tok"),
    ({"mlp_only_layers": [0, 7]}, "mlp_only_layers"),
    ({"mlp_only_layers": [0, 1, 2, 3]}, "leave no MoE layer"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"moe_intermediate_size": 0}, "moe_intermediate_size"),
    ({"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2}, "max_window_layers"),
    ({"router_balance_scope": "batch"}, "router_balance_scope"),
])
def test_invalid_configs_are_refused_naming_the_field(change, field):
    with pytest.raises(UserError, match=field):
        preset_config("qwen3-moe-tiny", **change)


def test_hf_dict_errors_name_the_key():
    with pytest.raises(UserError, match="attention_dropout"):
        Qwen3MoeConfig.from_hf_dict({**HUB_30B_A3B, "attention_dropout": 0.1})
    with pytest.raises(UserError, match="rope type 'yarn'"):
        Qwen3MoeConfig.from_hf_dict({**HUB_30B_A3B, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(UserError, match="model_type is 'mixtral'"):
        Qwen3MoeConfig.from_hf_dict({**HUB_30B_A3B, "model_type": "mixtral"})
