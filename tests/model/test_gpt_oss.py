"""moecpt's gpt-oss against transformers' on random tiny checkpoints (sinks, alternating sliding and full
attention with a window shorter than the sequences, YaRN, biases everywhere, the clamped SwiGLU with a limit
small enough to bind): logits, losses, routing, gradients, generation, export, strict loading, the MXFP4
layout and its dequantisation, attention with sinks against its fp32 reference, and the config."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import moecpt
import moecpt.model.auto
from moecpt.errors import UserError
from moecpt.kernels.attention import sink_attention, sink_attention_reference
from moecpt.model import hf
from moecpt.model.auto import build_model
from moecpt.model.families import gpt_oss, preset_config
from moecpt.model.families.gpt_oss import GptOssAdapter, GptOssConfig
from moecpt.model.layers import sdpa_mask
from moecpt.model.mxfp4 import dequantize_mxfp4

transformers = pytest.importorskip("transformers")

from .parity import (  # noqa: E402
    assert_missing_tensor_refused,
    compare_forward,
    compare_generation,
    compare_gradients,
    compare_left_padding,
    random_ids,
    save_perturbed,
)

TOL = 1e-5
VOCAB = 128
YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32.0, beta_slow=1.0,
            truncate=False, rope_theta=10000.0)
SHAPES = {
    # name: transformers GptOssConfig fields beyond the base ones below
    "gqa-yarn-window5": dict(),
    "mha-top1-full-then-sliding": dict(num_key_value_heads=4, num_experts_per_tok=1, num_local_experts=4,
                                       layer_types=["full_attention", "sliding_attention", "sliding_attention"],
                                       rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
}


def hf_config(**kw):
    args = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2, sliding_window=5,
                max_position_embeddings=256, router_aux_loss_coef=0.02, output_router_logits=True, pad_token_id=0,
                swiglu_limit=0.05, rope_parameters=YARN)
    return transformers.GptOssConfig(**(args | kw))


def make_hf_model(path, seed: int = 0, **kw):
    """A random transformers gpt-oss saved to `path` (norms, biases and sinks perturbed), in eval mode."""
    hf = save_perturbed(transformers.GptOssForCausalLM, hf_config(**kw), path, seed)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.sinks.add_(torch.randn_like(layer.self_attn.sinks))
    hf.save_pretrained(path)
    return hf


def ids_of(shape, seed):
    return random_ids(shape, seed, VOCAB)


def hf_param_name(name: str) -> str:
    """transformers' in-memory name of a moecpt parameter."""
    return GptOssAdapter.hf_name(None, name, "bf16")


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_logits_losses_and_routing_match_transformers(tmp_path, monkeypatch, shape):
    hf = make_hf_model(tmp_path, **SHAPES[shape])
    model = moecpt.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert isinstance(model.config, GptOssConfig)
    assert [layer.self_attn.window for layer in model.layers] == [
        layer.self_attn.sliding_window for layer in hf.model.layers]
    seen = []  # the activation's inputs: the test's limit must bind on both sides of `up`
    original = gpt_oss.clamped_swiglu
    monkeypatch.setattr(gpt_oss, "clamped_swiglu", lambda h, a, lim: seen.append(h) or original(h, a, lim))
    compare_forward(hf, model, ids_of((3, 24), 1), monkeypatch, TOL)
    h = torch.cat(seen)
    assert (h > 0.05).float().mean() > 0.1 and (h < -0.05).float().mean() > 0.1 and (h.abs() < 0.05).any()


def test_sinks_and_windows_change_the_result(tmp_path):
    """The parity above is not vacuous: without the sinks, or with full attention, the logits differ."""
    make_hf_model(tmp_path)
    model = moecpt.from_pretrained(tmp_path).eval()
    ids = ids_of((2, 20), 2)
    with torch.no_grad():
        base = model(ids).logits
        for layer in model.layers:
            layer.self_attn.window = None
        full = model(ids).logits
        for layer in model.layers:
            layer.self_attn.sinks.fill_(-1e4)
        no_sinks = model(ids).logits
    assert torch.equal(base[:, :5], full[:, :5]) and (base[:, 5:] - full[:, 5:]).abs().max() > 1e-3
    assert (no_sinks - full).abs().max() > 1e-3


def test_left_padding_matches_transformers(tmp_path):
    hf = make_hf_model(tmp_path)
    model = moecpt.from_pretrained(tmp_path).eval()
    ids = ids_of((3, 20), 3)
    compare_left_padding(hf, model, ids, TOL)


def test_every_gradient_matches_transformers(tmp_path):
    hf = make_hf_model(tmp_path)
    model = moecpt.from_pretrained(tmp_path)
    adapter = GptOssAdapter(model.config)

    def to_ours(name, grad):  # transformers' [E, H, 2F] interleaved experts as moecpt's [E, 2F, H] halves
        return adapter.hf_tensor(name, lambda _: grad, "bf16")

    compare_gradients(hf, model, ids_of((2, 16), 4), hf_param_name, TOL, to_ours)


def test_greedy_generation_with_a_window_shorter_than_the_prompt_matches_transformers(tmp_path):
    hf = make_hf_model(tmp_path)
    compare_generation(hf, moecpt.from_pretrained(tmp_path), ids_of((3, 11), 5), {0: 4, 2: 2})


def test_export_round_trips_through_transformers(tmp_path):
    make_hf_model(tmp_path / "src", **SHAPES["mha-top1-full-then-sliding"])
    model = moecpt.from_pretrained(tmp_path / "src").eval()
    model.save_pretrained(tmp_path / "out", max_shard_size="30KB")
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 1
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in written and written["layer_types"][0] == "full_attention"
    reloaded, info = transformers.GptOssForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert reloaded.config.layer_types == list(model.config.attention_types)
    ids = ids_of((2, 12), 7)
    with torch.no_grad():
        assert (reloaded.eval()(ids).logits - model(ids).logits).abs().max().item() <= TOL
    again = moecpt.from_pretrained(tmp_path / "out")
    assert again.config == model.config
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)


@pytest.mark.parametrize("victim", ["model.layers.2.mlp.experts.gate_up_proj_bias", "model.layers.0.self_attn.sinks",
                                    "model.layers.1.mlp.router.bias"])
def test_a_checkpoint_missing_a_tensor_is_refused_naming_it(tmp_path, victim):
    make_hf_model(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert_missing_tensor_refused(tmp_path, tensors, victim)


# ---- MXFP4 ----------------------------------------------------------------------------------------------
def random_packed(shape, seed):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8, generator=g)
    return blocks, torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("shape", [(3, 5, 7), (1, 1, 1), (2, 6, 3), (5, 64, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_dequantisation_is_bit_identical_to_transformers(shape, dtype):
    """Every byte and every scale (0..255, inf and nan where 2^128 appears) on odd shapes."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = random_packed(shape, seed=sum(shape))
    scales.view(-1)[: min(256, scales.numel())] = torch.arange(min(256, scales.numel()), dtype=torch.uint8)
    theirs = convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=dtype)
    ours = dequantize_mxfp4(blocks, scales, dtype)
    assert ours.shape == theirs.shape == (shape[0], shape[2] * 32, shape[1]) and ours.dtype == dtype
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(ours.view(bits), theirs.view(bits))
    # fp32 then one cast equals dequantising in bf16 (what loading with dtype=bf16 does)
    assert torch.equal(dequantize_mxfp4(blocks, scales).to(torch.bfloat16).view(torch.int16),
                       convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16).view(torch.int16))


def test_mxfp4_blocks_that_do_not_fit_their_scales_are_refused():
    blocks, scales = random_packed((2, 3, 4), 0)
    with pytest.raises(UserError, match="do not fit"):
        dequantize_mxfp4(blocks, scales[:, :, :3])


def quantise_checkpoint(src, dst, seed: int = 0) -> dict[str, torch.Tensor]:
    """`src`'s checkpoint with random MXFP4 expert matrices in the hub's names (config.json as published, with
    its quantization_config); returns the plain tensors transformers' dequantisation gives for them."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (dst / "config.json").write_text(json.dumps(config))
    tensors, plain = load_file(str(src / "model.safetensors")), {}
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        E, cols, rows = tensors.pop(name).shape  # [E, H, 2F] / [E, F, H]: rows packed along the columns
        blocks, scales = random_packed((E, rows, cols // 32), seed)
        scales = scales % 8 + 120  # realistic scales: 2^-7 .. 2^0
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        plain[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
        seed += 1
    save_file(tensors, str(dst / "model.safetensors"))
    return plain


def test_an_mxfp4_checkpoint_loads_dequantised_and_exports_unquantised(tmp_path):
    make_hf_model(tmp_path / "src", hidden_size=64, intermediate_size=32)
    plain = quantise_checkpoint(tmp_path / "src", tmp_path / "mxfp4")
    with pytest.warns(UserWarning, match="MXFP4 expert weights are dequantised on load"):
        model = moecpt.from_pretrained(tmp_path / "mxfp4")
    model.save_pretrained(tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert not any(n.endswith(("_blocks", "_scales")) for n in out)
    for name, t in plain.items():
        assert torch.equal(out[name], t), name
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    reloaded, info = transformers.GptOssForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = ids_of((2, 9), 8)
    with torch.no_grad():
        assert (reloaded.eval()(ids).logits - model.eval()(ids).logits).abs().max().item() <= TOL


def test_an_mxfp4_checkpoint_missing_scales_is_refused_naming_them(tmp_path):
    make_hf_model(tmp_path / "src", hidden_size=64, intermediate_size=32)
    quantise_checkpoint(tmp_path / "src", tmp_path / "mxfp4")
    tensors = load_file(str(tmp_path / "mxfp4" / "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.down_proj_scales"]
    save_file(tensors, str(tmp_path / "mxfp4" / "model.safetensors"))
    with warnings.catch_warnings(), pytest.raises(UserError, match=r"missing \(1\): model\.layers\.1\.mlp\.experts"
                                                                  r"\.down_proj_scales"):
        warnings.simplefilter("ignore")
        moecpt.from_pretrained(tmp_path / "mxfp4")


@pytest.mark.parametrize("layout", ["bf16", "mxfp4"])
def test_a_sharded_load_reads_only_its_experts(tmp_path, layout):
    """init_from on many ranks: each reads (and dequantises) only the experts it holds, never a whole tensor,
    and gets exactly its part of the full load (rows of the interleaved gate/up halves included)."""
    make_hf_model(tmp_path / "bf16", hidden_size=64, intermediate_size=32)
    if layout == "mxfp4":
        quantise_checkpoint(tmp_path / "bf16", tmp_path / "mxfp4")
    config = moecpt.model.auto.load_config(tmp_path / layout)
    adapter, tensors = GptOssAdapter(config), hf.SafetensorsDir(tmp_path / layout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert adapter.detect_layout(tensors.names()) == layout

    def whole(name):
        raise AssertionError(f"{name} read whole")

    for name, shape in adapter.state_shapes().items():
        full = adapter.hf_tensor(name, tensors.get, layout)
        for region in (tuple(slice(n // 3, max(n // 3 + 1, n - n // 5)) for n in shape),
                       (slice(0, max(1, shape[0] // 2)), *(slice(0, n) for n in shape[1:]))):
            assert torch.equal(adapter.hf_region(name, whole, tensors.get_slice, layout, region), full[region]), name


# ---- attention with sinks -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["causal", "padding-window", "cache-window", "mha"])
def test_sink_attention_matches_the_fp32_reference_with_gradients(case):
    g = torch.Generator().manual_seed(0)
    B, h, hk, D, T, past = 2, 4, 2 if case != "mha" else 4, 16, 9, 6 if case == "cache-window" else 0
    q = torch.randn(B, h, T, D, generator=g, requires_grad=True)
    k = torch.randn(B, hk, past + T, D, generator=g, requires_grad=True)
    v = torch.randn(B, hk, past + T, D, generator=g, requires_grad=True)
    sinks = torch.randn(h, generator=g).mul(2).requires_grad_()
    ids = torch.ones(B, T, dtype=torch.long)
    attention_mask = torch.ones(B, past + T, dtype=torch.long)
    attention_mask[0, :3] = 0
    window = 4 if "window" in case else None
    positions = torch.arange(past, past + T).expand(B, T)
    mask = sdpa_mask(ids, attention_mask if case != "causal" else None, positions, False, past, window)
    assert (mask is None) == (case == "causal")
    outs = []
    for fn in (sink_attention, sink_attention_reference):
        out = fn(q, k, v, sinks, mask)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, D)).sum(), (q, k, v, sinks))
        outs.append((out, grads))
    (ours, our_grads), (ref, ref_grads) = outs
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    for a, b in zip(our_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert ref_grads[3].abs().min() > 0  # every head's sink takes part


def test_sink_attention_never_asks_sdpa_for_gqa_with_a_mask(monkeypatch):
    """Attention with sinks always has a mask (the sink column), and on CUDA SDPA runs GQA only in the flash
    kernel, which takes no mask, or in the math one, which holds [B, heads, T, T] fp32 scores (4 GB per layer of
    gpt-oss at 4,096 tokens): the kv heads are repeated instead, so that a memory-efficient kernel can run.
    (A CPU cannot show the fallback: its flash kernel takes both.)"""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((q.shape[1], k.shape[1], kw.get("enable_gqa", False), kw.get("attn_mask") is not None))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 7, 16, generator=g) for h in (4, 2, 2))
    sinks = torch.randn(4, generator=g)
    out = sink_attention(q, k, v, sinks, None)
    torch.testing.assert_close(out, sink_attention_reference(q, k, v, sinks, None), atol=1e-6, rtol=0)
    assert calls == [(4, 4, False, True)]


# ---- config ---------------------------------------------------------------------------------------------
PUBLISHED_20B = {  # openai/gpt-oss-20b's config.json (keys transformers does not read left in)
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "eos_token_id": 200002,
    "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096,
    "initializer_range": 0.02, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
    "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
    "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05, "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                            "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                            "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "use_cache": True, "vocab_size": 201088,
}


def test_published_config_reads_as_the_preset_and_round_trips():
    ours = GptOssConfig.from_hf_dict(PUBLISHED_20B)
    assert ours == preset_config("gpt-oss-20b", layer_types=tuple(PUBLISHED_20B["layer_types"]))
    again = GptOssConfig.from_hf_dict(json.loads(json.dumps(ours.to_hf_dict())))
    assert again == ours and ours.to_hf_dict()["rope_parameters"]["rope_type"] == "yarn"
    theirs = transformers.GptOssConfig(**{k: v for k, v in ours.to_hf_dict().items() if k != "torch_dtype"})
    assert theirs.rope_parameters["factor"] == 32.0 and theirs.layer_types == list(ours.attention_types)


def test_a_config_without_rope_or_layer_types_takes_transformers_defaults():
    d = {"model_type": "gpt_oss", "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
         "vocab_size": 100, "head_dim": 16, "num_local_experts": 4}
    ours, theirs = GptOssConfig.from_hf_dict(d), transformers.GptOssConfig(**d)
    assert list(ours.attention_types) == theirs.layer_types
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"] == 150000
    assert ours.rope_scaling.to_hf() | {"rope_theta": 150000} == theirs.rope_parameters


@pytest.mark.parametrize("change,field", [
    (dict(layer_types=["full_attention"]), "layer_types"),
    (dict(layer_types=["sliding_attention", "chunked_attention"]), "chunked_attention"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(swiglu_limit=0.0), "swiglu_limit"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4}), "llama3"),
    (dict(quantization_config={"quant_method": "compressed-tensors"}), "quant_method 'compressed-tensors'"),
])
def test_invalid_configs_are_refused_naming_the_field(change, field):
    base = {"model_type": "gpt_oss", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 64, "num_local_experts": 8}
    with pytest.raises(UserError, match=field):
        GptOssConfig.from_hf_dict(base | change)


def test_presets_have_the_published_sizes():
    """OpenAI's model card: 20.9B and 116.8B parameters; 3.6B and 5.1B active, counting the unembedding but
    not the embedding (a lookup)."""
    for name, total, active in (("gpt-oss-20b", 20.9, 3.6), ("gpt-oss-120b", 116.8, 5.1)):
        model = build_model(preset_config(name))  # on the meta device
        assert round(model.num_params() / 1e9, 1) == total, name
        assert round((model.num_params(active=True) - model.embed_tokens.weight.numel()) / 1e9, 1) == active, name
    tiny = preset_config("gpt-oss-tiny")
    assert tiny.attention_types == ("sliding_attention", "full_attention")
