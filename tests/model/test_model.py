"""The model's own behaviour: losses, masks, KV cache, grouped GEMM, presets."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moecpt.errors import UserError
from moecpt.model import MixtralConfig, MixtralForCausalLM
from moecpt.model.moe import grouped_mm


def tiny(**kw) -> MixtralForCausalLM:
    torch.manual_seed(0)
    cfg = MixtralConfig.from_preset("tiny", vocab_size=96, **kw)
    return MixtralForCausalLM(cfg).eval()


def test_presets_have_the_documented_shapes():
    big = MixtralConfig.from_preset("mixtral-8x7b")
    with torch.device("meta"):
        n = MixtralForCausalLM(big).num_params()
        active = MixtralForCausalLM(big).num_params(active=True)
    assert round(n / 1e9, 1) == 46.7  # Mixtral-8x7B: 46.7B parameters, 12.9B active
    assert round(active / 1e9, 1) == 12.9
    b = MixtralConfig.from_preset("bench-1b")
    assert (b.num_hidden_layers, b.hidden_size, b.intermediate_size, b.num_attention_heads,
            b.num_key_value_heads, b.num_local_experts, b.num_experts_per_tok, b.vocab_size) == (
        12, 1024, 3584, 16, 4, 8, 2, 32000)
    with pytest.raises(UserError, match="unknown model preset 'huge'"):
        MixtralConfig.from_preset("huge")


def test_invalid_config_is_refused_with_the_key_named():
    with pytest.raises(UserError, match="num_experts_per_tok"):
        MixtralConfig.from_preset("tiny", num_experts_per_tok=9)
    with pytest.raises(UserError, match="num_key_value_heads"):
        MixtralConfig.from_preset("tiny", num_key_value_heads=3)


def test_targets_equal_shifted_labels_and_ignored_tokens_take_no_part():
    model = tiny()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    by_labels = model(ids, labels=ids)
    by_targets = model(ids, targets=F.pad(ids[:, 1:], (0, 1), value=-100))
    assert torch.equal(by_labels.ce_loss, by_targets.ce_loss)
    assert by_targets.num_targets.item() == 2 * 11

    targets = F.pad(ids[:, 1:], (0, 1), value=-100)
    targets[0, :5] = -100
    out = model(ids, targets=targets)  # the losses alone: no [B, T, V] logits
    assert not hasattr(out, "logits")
    keep = targets != -100
    manual = F.cross_entropy(model(ids).logits[keep], targets[keep])
    assert out.ce_loss.item() == pytest.approx(manual.item(), abs=1e-6)
    assert out.loss.item() == pytest.approx((out.ce_loss + 0.02 * out.aux_loss).item(), abs=1e-6)


def test_z_loss_enters_the_loss_with_its_coefficient():
    model = tiny(router_z_loss_coef=0.5)
    ids = torch.randint(0, 96, (1, 8))
    out = model(ids, labels=ids)
    assert out.z_loss.item() > 0
    assert out.loss.item() == pytest.approx((out.ce_loss + 0.02 * out.aux_loss + 0.5 * out.z_loss).item(), rel=1e-6)


def test_intra_document_attention_equals_running_documents_separately():
    model = tiny()
    a = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(2))
    b = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(3))
    packed = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        together = model(packed, position_ids=pos, intra_doc_attention=True).logits
        alone = torch.cat([model(a).logits, model(b).logits], dim=1)
        leaky = model(packed).logits
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert (leaky[:, 7:] - alone[:, 7:]).abs().max() > 1e-3  # without the mask the second doc sees the first


def test_kv_cache_decoding_equals_the_full_forward():
    model = tiny()
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 10, torch.float32, torch.device("cpu"))
        first = model(ids[:, :6], cache=cache).logits
        steps = [model(ids[:, t:t + 1], cache=cache).logits for t in range(6, 10)]
    torch.testing.assert_close(torch.cat([first, *steps], dim=1), full, atol=1e-5, rtol=1e-5)


def test_sliding_window_limits_attention():
    model = tiny(sliding_window=4, num_hidden_layers=1)  # one layer: no receptive field growth
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        windowed = model(ids).logits
        # The last token sees only the last 4 positions: the same logits as a forward over those alone,
        # given the same RoPE positions.
        tail = model(ids[:, 6:], position_ids=torch.arange(6, 10)[None]).logits
    torch.testing.assert_close(windowed[:, -1], tail[:, -1], atol=1e-5, rtol=1e-5)


def test_sampling_is_seeded_and_differs_from_greedy():
    model = tiny()
    ids = torch.randint(0, 96, (2, 4))
    s1 = model.generate(ids, max_new_tokens=12, do_sample=True, temperature=5.0, eos_token_id=[],
                        generator=torch.Generator().manual_seed(0))
    s2 = model.generate(ids, max_new_tokens=12, do_sample=True, temperature=5.0, eos_token_id=[],
                        generator=torch.Generator().manual_seed(0))
    greedy = model.generate(ids, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(s1, s2)
    assert not torch.equal(s1, greedy)


def test_generation_refuses_to_run_past_the_context():
    model = tiny()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(torch.zeros(1, 2040, dtype=torch.long), max_new_tokens=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_matches_a_loop_with_empty_groups_and_gradients(dtype):
    g = torch.Generator().manual_seed(6)
    counts = [5, 0, 11, 0, 16]
    x = torch.randn(sum(counts), 16, generator=g).to(dtype).requires_grad_()
    w = torch.randn(5, 16, 32, generator=g).to(dtype).requires_grad_()
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    y = grouped_mm(x, w, offs)
    grad = torch.randn(y.shape, generator=g).to(dtype)
    (y * grad).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()

    x.grad = w.grad = None
    ref = torch.cat([xi @ w[i] for i, xi in enumerate(torch.split(x, counts))])
    (ref * grad).sum().backward()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)
    torch.testing.assert_close(y, ref, **tol)
    torch.testing.assert_close(gx, x.grad, **tol)
    torch.testing.assert_close(gw, w.grad, **tol)
    assert gw[1].abs().sum() == 0 and gw[3].abs().sum() == 0  # experts that got no tokens get no gradient


def test_experts_without_tokens_keep_the_step_valid():
    model = tiny()
    for layer in model.layers:  # a router that sends every token to experts 0 and 1
        def forced(x, original=layer.moe.gate.forward):
            logits, scores, weights, _ = original(x)
            return logits, scores, weights, torch.tensor([0, 1]).expand(x.shape[0], 2)

        layer.moe.gate.forward = forced
    ids = torch.randint(0, 96, (2, 8))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert out.expert_counts[:, 2:].sum() == 0
    assert torch.isfinite(out.loss)
    grads = model.layers[0].moe.experts.gate_up_proj.grad
    assert grads[2:].abs().sum() == 0 and grads[:2].abs().sum() > 0


def test_training_step_in_bf16_autocast_keeps_router_in_fp32():
    model = tiny().train()
    ids = torch.randint(0, 96, (2, 8))
    seen = {}
    original = model.layers[0].moe.gate.forward

    def spy(x):
        logits, scores, w, e = original(x)
        seen["dtype"] = logits.dtype
        return logits, scores, w, e

    model.layers[0].moe.gate.forward = spy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    out.loss.backward()
    assert seen["dtype"] == torch.float32
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_config_round_trips_through_hf_dict():
    cfg = MixtralConfig.from_preset("tiny", rope_theta=1e4, tie_word_embeddings=True)
    back = MixtralConfig.from_hf_dict(cfg.to_hf_dict())
    assert back == dataclasses.replace(cfg, router_z_loss_coef=0.0)
    # transformers 5 spells rope_theta inside rope_parameters
    d = cfg.to_hf_dict()
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    del d["rope_theta"]
    assert MixtralConfig.from_hf_dict(d).rope_theta == 5e5
    d["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(UserError, match="yarn"):
        MixtralConfig.from_hf_dict(d)


def test_experts_run_in_the_autocast_dtype_with_fp32_gradients():
    from moecpt.model.moe import swiglu_experts

    g = torch.Generator().manual_seed(8)
    x = torch.randn(12, 16, generator=g)
    gate_up = torch.randn(3, 2 * 32, 16, generator=g).requires_grad_()
    down = torch.randn(3, 16, 32, generator=g).requires_grad_()
    offs = torch.tensor([4, 4, 12], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = swiglu_experts(x, gate_up, down, offs)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert gate_up.grad.dtype == torch.float32 and down.grad.dtype == torch.float32
    ref = swiglu_experts(x, gate_up.detach(), down.detach(), offs)
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2  # bf16 rounding, not a different result
