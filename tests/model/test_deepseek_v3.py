"""moecpt's DeepSeek-V3 against transformers' on random tiny checkpoints (low-rank queries or not, interleaved
RoPE or not, YaRN with DeepSeek's softmax correction, n_group > 1 with topk_group < n_group, a nonzero
selection bias, dense first layers, shared experts): logits, loss, routing per token, gradients, generation,
both weight layouts, export; multi-token prediction layers kept, exported and trained; fp8 block
dequantisation equal to transformers'; the config read from config.json and refused where it would differ."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import moecpt
import moecpt.model.auto
from moecpt.errors import UserError
from moecpt.model import fp8, hf
from moecpt.model.auto import build_model
from moecpt.model.families import preset_config
from moecpt.model.families.deepseek_v3 import DeepseekV3Adapter, DeepseekV3Config

transformers = pytest.importorskip("transformers")

from .parity import (  # noqa: E402
    assert_missing_tensor_refused,
    compare_generation,
    compare_gradients,
    random_ids,
    save_perturbed,
)

TOL = 1e-5
VOCAB = 128
YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32, beta_fast=32, beta_slow=1,
            mscale=1.0, mscale_all_dim=0.8)

SHAPES = {
    # name: transformers DeepseekV3Config fields beyond the base ones below
    "qlora-interleave-yarn": dict(rope_parameters=YARN),
    "no-qlora-halves": dict(q_lora_rank=None, rope_interleave=False),
    "qlora-yarn-bias-top3": dict(rope_parameters=YARN, attention_bias=True, num_experts_per_tok=3, n_group=2,
                                 topk_group=1, norm_topk_prob=False, first_k_dense_replace=0),
}


def hf_config(**kw):
    args = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
                topk_group=2, first_k_dense_replace=1, n_shared_experts=2, kv_lora_rank=16, q_lora_rank=24,
                qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, max_position_embeddings=128,
                routed_scaling_factor=2.5, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.DeepseekV3Config(**(args | kw))


def make_hf_model(path, seed: int = 0, **kw):
    """A random transformers DeepSeek-V3 saved to `path`: norms and biases perturbed, and a nonzero random
    selection bias (transformers starts it at zero) so that it must steer the routing."""
    model = save_perturbed(transformers.DeepseekV3ForCausalLM, hf_config(**kw), path, seed)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.2 * torch.randn(b.shape, generator=torch.Generator().manual_seed(seed + 1)))
    model.save_pretrained(path)
    return model


def hf_routing(hf) -> list[torch.Tensor]:
    """The experts transformers' routers choose, in call order."""
    seen = []
    for layer in hf.model.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.register_forward_hook(lambda m, i, out: seen.append(out[2].detach().clone()))
    return seen


def our_routing(model, monkeypatch) -> list[torch.Tensor]:
    from .parity import capture_routing
    return capture_routing(monkeypatch)


def fused_name(name: str) -> str:
    """transformers 5's in-memory name of a moecpt parameter."""
    if ".experts." in name:
        return "model." + name.replace(".moe.", ".mlp.")
    return DeepseekV3Adapter(None).hf_name(name, "fused")


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_logits_loss_and_routing_match_transformers(tmp_path, monkeypatch, shape):
    hf = make_hf_model(tmp_path, **SHAPES[shape])
    model = moecpt.from_pretrained(tmp_path).eval()
    c = model.config
    assert isinstance(c, DeepseekV3Config) and c.num_nextn_predict_layers == 0  # transformers saves no MTP
    assert c.sparse_layers == [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "gate")]
    assert model.layers[c.sparse_layers[0]].moe.gate.e_score_correction_bias.abs().min() > 0
    theirs_routing, ours_routing = hf_routing(hf), our_routing(model, monkeypatch)
    ids = random_ids((3, 24), 1, VOCAB)
    with torch.no_grad():
        theirs, ours = hf(ids, labels=ids), model(ids, labels=ids)
    assert (theirs.logits - ours.logits).abs().max().item() <= TOL
    assert ours.aux_loss.item() > 0 and c.router_aux_loss_coef == 0.0  # computed, not weighted by default
    assert ours.loss.item() == pytest.approx(theirs.loss.item(), abs=1e-6)
    assert len(theirs_routing) == len(ours_routing) == len(c.sparse_layers)
    for layer, (a, b) in enumerate(zip(theirs_routing, ours_routing, strict=True)):
        assert torch.equal(a.sort(-1).values, b.sort(-1).values), f"MoE layer {layer}"


def test_group_limit_and_selection_bias_steer_the_routing(tmp_path, monkeypatch):
    """The routing parity above is not vacuous: without the group limit or the bias other experts win."""
    make_hf_model(tmp_path)
    model = moecpt.from_pretrained(tmp_path).eval()
    ids = random_ids((2, 24), 2, VOCAB)
    routing = our_routing(model, monkeypatch)
    gate = model.layers[1].moe.gate
    with torch.no_grad():
        model(ids)
        gate.n_group = 1
        model(ids)
        gate.n_group = 4
        gate.e_score_correction_bias.zero_()
        model(ids)
    grouped, ungrouped, unbiased = routing[0], routing[2], routing[4]
    assert not torch.equal(grouped.sort(-1).values, ungrouped.sort(-1).values)
    assert not torch.equal(grouped.sort(-1).values, unbiased.sort(-1).values)
    groups = grouped // 2  # 8 experts in 4 groups: a token's experts lie in at most topk_group = 2 groups
    assert all(len(set(row)) <= 2 for row in groups.tolist())


def test_every_gradient_matches_transformers(tmp_path):
    hf = make_hf_model(tmp_path, rope_parameters=YARN)
    compare_gradients(hf, moecpt.from_pretrained(tmp_path), random_ids((2, 32), 4, VOCAB), fused_name, TOL)


def test_greedy_generation_with_left_padding_matches_transformers(tmp_path):
    hf = make_hf_model(tmp_path, **SHAPES["no-qlora-halves"])
    compare_generation(hf, moecpt.from_pretrained(tmp_path), random_ids((3, 11), 5, VOCAB), {0: 4, 2: 2})


def test_fused_layout_loads_and_export_round_trips_through_transformers(tmp_path):
    hf = make_hf_model(tmp_path / "hub", **SHAPES["qlora-interleave-yarn"])
    hub = load_file(str(tmp_path / "hub" / "model.safetensors"))
    assert {"model.layers.1.mlp.experts.7.gate_proj.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
            "model.layers.2.mlp.shared_experts.down_proj.weight", "model.layers.0.mlp.up_proj.weight"} <= set(hub)
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((tmp_path / "hub" / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(fused / "model.safetensors"))
    ids = random_ids((2, 12), 6, VOCAB)
    model = moecpt.from_pretrained(fused).eval()
    model.save_pretrained(tmp_path / "out")
    reloaded, info = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert reloaded.config.rope_parameters["rope_type"] == "yarn"
    with torch.no_grad():
        expected = hf(ids).logits
        assert (model(ids).logits - expected).abs().max().item() <= TOL
        assert (reloaded.eval()(ids).logits - expected).abs().max().item() <= TOL
    again = moecpt.from_pretrained(tmp_path / "out")
    assert again.config == model.config
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)


@pytest.mark.parametrize("victim", ["model.layers.2.mlp.gate.e_score_correction_bias",
                                    "model.layers.1.mlp.experts.3.down_proj.weight",
                                    "model.layers.0.self_attn.kv_a_layernorm.weight"])
def test_a_checkpoint_missing_a_tensor_is_refused_naming_it(tmp_path, victim):
    make_hf_model(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert_missing_tensor_refused(tmp_path, tensors, victim)


# ---- multi-token prediction ---------------------------------------------------------------------------------------
def add_mtp_layer(path, seed: int = 7) -> dict[str, torch.Tensor]:
    """Append one MTP layer (as the hub checkpoints store it: model.layers.{N}.*) to a saved model: a copy of
    the last MoE layer perturbed, random enorm/hnorm/eh_proj/shared_head.norm, and copies of the embedding and
    head. Returns the MTP tensors."""
    tensors = load_file(str(path / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    n = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    mtp = {k.replace(f"model.layers.{n - 1}.", f"model.layers.{n}."): v + 0.01 * torch.randn(v.shape, generator=g)
           for k, v in tensors.items() if k.startswith(f"model.layers.{n - 1}.")}
    H = tensors["model.embed_tokens.weight"].shape[1]
    p = f"model.layers.{n}."
    mtp |= {p + "enorm.weight": 1 + 0.1 * torch.randn(H, generator=g), p + "hnorm.weight": 1 + 0.1 * torch.randn(H, generator=g),
            p + "eh_proj.weight": 0.1 * torch.randn(H, 2 * H, generator=g),
            p + "shared_head.norm.weight": 1 + 0.1 * torch.randn(H, generator=g),
            p + "embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
            p + "shared_head.head.weight": tensors["lm_head.weight"].clone()}
    save_file(tensors | mtp, str(path / "model.safetensors"))
    return mtp


def test_mtp_layers_are_kept_and_exported_unchanged_when_not_trained(tmp_path, caplog):
    hf = make_hf_model(tmp_path / "src")
    mtp = add_mtp_layer(tmp_path / "src")
    with caplog.at_level("WARNING"):
        model = moecpt.from_pretrained(tmp_path / "src").eval()
    assert "multi-token prediction layer(s) loaded" in caplog.text
    assert model.config.num_nextn_predict_layers == 1 and model.config.mtp_loss_coef == 0
    ids = random_ids((2, 12), 8, VOCAB)
    with torch.no_grad():  # not run: the main model is unchanged
        assert (model(ids, labels=ids).logits - hf(ids).logits).abs().max().item() <= TOL
    model.save_pretrained(tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, t in mtp.items():
        assert torch.equal(out[name], t), name
    _, info = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    # transformers drops MTP tensors silently only at layer 61 (DeepSeek-V3's); here they are the sole extras.
    unexpected = set(info["unexpected_keys"])  # in transformers' fused spelling of the experts
    assert not info["missing_keys"] and unexpected and all(k.startswith("model.layers.3.") for k in unexpected)


def test_mtp_layer_matches_transformers_mtp_layer_and_trains_with_its_own_coefficient(tmp_path):
    from transformers.modeling_layers import MtpLayer
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds

    hf = make_hf_model(tmp_path)
    mtp = add_mtp_layer(tmp_path)
    model = moecpt.from_pretrained(tmp_path)
    ids = random_ids((2, 16), 9, VOCAB)
    # transformers' MTP layer (its speculative-decoding module) with the checkpoint's weights, on the main
    # model's final hidden states and the embeddings of the next tokens.
    ref = MtpLayer(hf.config.get_mtp_config(), ds.DeepseekV3DecoderLayer, ds.DeepseekV3RMSNorm, 0).eval()
    n = hf.config.num_hidden_layers
    state = {k[len(f"model.layers.{n}."):]: v for k, v in mtp.items()}
    state = {("post_norm." + k[len("shared_head.norm."):] if k.startswith("shared_head.norm.") else
              k if k.split(".")[0] in ("enorm", "hnorm", "eh_proj") else "mtp_block." + k): v
             for k, v in state.items() if not k.startswith(("embed_tokens", "shared_head.head"))}
    block = ref.mtp_block.mlp
    state = {k: v for k, v in state.items() if ".experts." not in k}
    E = hf.config.n_routed_experts
    stack = {p: torch.stack([mtp[f"model.layers.{n}.mlp.experts.{j}.{p}.weight"] for j in range(E)])
             for p in ("gate_proj", "up_proj", "down_proj")}
    with torch.no_grad():
        block.experts.gate_up_proj.copy_(torch.cat([stack["gate_proj"], stack["up_proj"]], dim=1))
        block.experts.down_proj.copy_(stack["down_proj"])
    ref.load_state_dict(state, strict=False)
    with torch.no_grad():
        h = hf.model(ids[:, :-1]).last_hidden_state
        pos = torch.arange(15)[None]
        cos_sin = hf.model.rotary_emb(h, pos)
        expected = ref(hf.model.embed_tokens(ids[:, 1:]), h, cos_sin, None, pos, None)
        cos, sin = model.rope(pos.expand(2, 15))
        ours, _ = model.mtp[0](model.embed_tokens(ids[:, 1:]), h, cos, sin, None, None)
    assert (ours - expected).abs().max().item() <= TOL

    targets = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    off = model(ids, targets=targets)
    assert off.mtp_loss is None and model.mtp[0].eh_proj.weight.grad is None
    model.config = dataclasses.replace(model.config, mtp_loss_coef=0.3)
    on = model(ids, targets=targets)
    # Depth 1 predicts token t + 2 from position t: the head on the MTP layer's output, as computed above.
    with torch.no_grad():
        h = model.trunk(ids, None, None, False, None, None)[0][:, :-1]
        cos, sin = model.rope(torch.arange(15)[None].expand(2, 15))
        logits = model.lm_head(model.mtp[0](model.embed_tokens(ids[:, 1:]), h, cos, sin, None, None)[0])
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 2:].reshape(-1),
                                               reduction="sum")
    assert on.mtp_loss.item() == pytest.approx(manual.item(), rel=1e-5)
    assert torch.equal(on.token_loss, off.token_loss)
    assert on.loss.item() == pytest.approx(off.loss.item() + 0.3 * manual.item() / on.num_targets.item(), rel=1e-6)
    on.loss.backward()
    assert model.mtp[0].eh_proj.weight.grad.abs().max() > 0 and len(on.expert_counts) == 3  # 2 MoE + MTP


# ---- fp8 --------------------------------------------------------------------------------------------------------------
def packed_fp8(rows: int, cols: int, block, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = torch.rand(math.ceil(rows / block[0]), math.ceil(cols / block[1]), generator=g) * 1e-2 + 1e-4
    return w, s


@pytest.mark.parametrize("rows,cols,block", [(256, 384, (128, 128)), (576, 200, (128, 128)), (37, 5, (16, 4)),
                                             (130, 129, (128, 128))])
def test_fp8_dequantisation_equals_transformers(rows, cols, block):
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight

    w, s = packed_fp8(rows, cols, block, rows + cols)
    ours = fp8.dequantize(w, s, block, torch.float32)
    assert torch.equal(ours, _dequantize_fp8_weight(w, s, list(block), torch.float32))
    if rows % block[0] == 0 and cols % block[1] == 0:  # the loader's path derives the block from the grid
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(fp8.dequantize(w, s, block, dtype), Fp8Dequantize(None)._dequantize_one(w, s, dtype))
    with pytest.raises(UserError, match="weight_scale_inv"):
        fp8.dequantize(w, s[:-1], block)


def quantise_fp8(path, block) -> dict[str, torch.Tensor]:
    """Store the projections of the checkpoint in `path` in fp8 with random block scales (the hub's names and
    choice of tensors: the routers, norms, embeddings and heads stay unquantised); returns what each dequantises
    to."""
    tensors = load_file(str(path / "model.safetensors"))
    expected = {}
    for name in list(tensors):
        t = tensors[name]
        if t.ndim == 2 and "norm" not in name and not name.endswith(("mlp.gate.weight", "embed_tokens.weight",
                                                                      "lm_head.weight", "shared_head.head.weight")):
            w, s = packed_fp8(*t.shape, block, len(name))
            tensors[name], tensors[name[:-len("weight")] + "weight_scale_inv"] = w, s
            expected[name] = fp8.dequantize(w, s, block)
    save_file(tensors, str(path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block)}
    (path / "config.json").write_text(json.dumps(cfg))
    return expected


def test_an_fp8_checkpoint_loads_dequantised(tmp_path):
    make_hf_model(tmp_path, q_lora_rank=None)
    expected = quantise_fp8(tmp_path, (16, 8))
    model = moecpt.from_pretrained(tmp_path)
    state = model.state_dict()
    assert torch.equal(state["layers.0.self_attn.kv_a_proj_with_mqa.weight"],
                       expected["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"])
    assert torch.equal(state["layers.1.moe.experts.down_proj"][3], expected["model.layers.1.mlp.experts.3.down_proj.weight"])
    model.save_pretrained(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in written
    assert all(t.dtype == torch.float32 for t in load_file(str(tmp_path / "out" / "model.safetensors")).values())
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.0.mlp.down_proj.weight_scale_inv"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match="model.layers.0.mlp.down_proj.weight_scale_inv"):
        moecpt.from_pretrained(tmp_path)


def odd_regions(shape):
    """Parts of a tensor as a sharded load asks for them: the first rank's rows, and a window off every block
    boundary in each dim."""
    yield (slice(0, max(1, shape[0] // 2)), *(slice(0, n) for n in shape[1:]))
    yield tuple(slice(n // 3, max(n // 3 + 1, n - n // 5)) for n in shape)


def test_a_sharded_load_reads_only_its_part_of_an_fp8_checkpoint(tmp_path):
    """init_from on many ranks: each reads its part of each tensor (the experts it holds, the fp8 rows and the
    scale blocks that cover them), never a whole tensor, and gets exactly that part of the full load."""
    make_hf_model(tmp_path, q_lora_rank=None)
    add_mtp_layer(tmp_path)
    quantise_fp8(tmp_path, (16, 8))
    config = moecpt.model.auto.load_config(tmp_path)
    adapter, tensors = DeepseekV3Adapter(config), hf.SafetensorsDir(tmp_path)
    assert config.num_nextn_predict_layers == 1 and fp8.is_fp8(tensors.get("model.layers.3.mlp.experts.2.up_proj.weight"))

    def whole(name):
        raise AssertionError(f"{name} read whole")

    for name, shape in adapter.state_shapes().items():
        full = adapter.hf_tensor(name, tensors.get, "hub")
        for region in odd_regions(shape):
            assert torch.equal(adapter.hf_region(name, whole, tensors.get_slice, "hub", region), full[region]), name


# ---- config -----------------------------------------------------------------------------------------------------------
HUB_V3 = {  # deepseek-ai/DeepSeek-V3's config.json, shrunk
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "aux_loss_alpha": 0.001,
    "ep_size": 1, "first_k_dense_replace": 3, "hidden_size": 64, "intermediate_size": 96, "kv_lora_rank": 16,
    "max_position_embeddings": 163840, "moe_intermediate_size": 16, "moe_layer_freq": 1, "n_group": 8,
    "n_routed_experts": 16, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 4,
    "num_experts_per_tok": 4, "num_hidden_layers": 5, "num_key_value_heads": 4, "num_nextn_predict_layers": 1,
    "q_lora_rank": 24, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                            "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "v_head_dim": 8, "vocab_size": 64}


def test_config_reads_the_hub_config_and_writes_transformers_one():
    c = DeepseekV3Config.from_hf_dict(HUB_V3)
    assert c.rope_scaling.factor == 40 and c.num_nextn_predict_layers == 1 and c.n_group == 8
    assert fp8.block_size(c.quantization_config) == (128, 128)
    assert c.softmax_scale == pytest.approx(16 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)
    d = c.to_hf_dict()
    assert "quantization_config" not in d and "mtp_loss_coef" not in d and "router_bias_update_rate" not in d
    assert d["rope_parameters"]["rope_type"] == "yarn"
    assert DeepseekV3Config.from_hf_dict(json.loads(json.dumps(d))) == dataclasses.replace(c, quantization_config=None)
    ours = transformers.DeepseekV3Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    assert ours.num_mtp_layers == 1 and ours.qk_head_dim == 16 and ours.rope_parameters["factor"] == 40


@pytest.mark.parametrize("change,field", [
    (dict(scoring_func="softmax"), "scoring_func"),
    (dict(topk_method="greedy"), "topk_method"),
    (dict(num_key_value_heads=2), "num_key_value_heads"),
    (dict(n_group=3), "n_group"),
    (dict(n_group=0), "n_group must be positive"),
    (dict(first_k_dense_replace=5), "first_k_dense_replace"),
    (dict(num_experts_per_tok=12, topk_group=1), "num_experts_per_tok"),
    (dict(quantization_config={"quant_method": "awq"}), "quant_method"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2}), "rope type"),
])
def test_invalid_configs_are_refused_naming_the_field(change, field):
    with pytest.raises(UserError, match=field):
        DeepseekV3Config.from_hf_dict(HUB_V3 | change)


def test_presets_and_the_default_balancing_regime():
    real = preset_config("deepseek-v3-671b")
    model = build_model(real)  # on the meta device
    # 671B in the main model (DeepSeek-V3 report) + one MTP layer; 37B activated per token in the main model.
    mtp = sum(p.numel() for p in model.mtp.parameters())
    assert round((model.num_params() - mtp) / 1e9) == 671
    assert (real.router_bias_update_rate, real.router_balance_scope, real.router_aux_loss_coef) == (0.001, "sequence", 0.0)
    assert model.layers[3].moe.gate.e_score_correction_bias.shape == (256,)
    tiny = preset_config("deepseek-v3-tiny")
    assert tiny.sparse_layers == [1, 2] and tiny.router_options()["n_group"] == 4
