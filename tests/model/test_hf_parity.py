"""moecpt's Mixtral against transformers' on random tiny checkpoints: logits, losses, routing, gradients,
generation, and both directions of checkpoint conversion."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import moecpt
from moecpt.model import moe as moe_module

from .hf_models import SHAPES, make_hf_model
from .parity import compare_left_padding

pytest.importorskip("transformers")

TOL = 1e-5


def _capture_routing(monkeypatch) -> list[torch.Tensor]:
    """Record the top-k expert indices every moecpt MoE layer chooses."""
    seen: list[torch.Tensor] = []
    original = moe_module.Router.forward

    def route(self, x):
        logits, scores, weights, experts = original(self, x)
        seen.append(experts.detach().clone())
        return logits, scores, weights, experts

    monkeypatch.setattr(moe_module.Router, "forward", route)
    return seen


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_logits_losses_and_routing_match_transformers(tmp_path, monkeypatch, shape):
    experts, top_k, heads, kv, tied = SHAPES[shape]
    hf = make_hf_model(tmp_path, experts=experts, top_k=top_k, heads=heads, kv_heads=kv, tied=tied)
    model = moecpt.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings == tied
    ids = torch.randint(1, 128, (3, 24), generator=torch.Generator().manual_seed(1))

    routing = _capture_routing(monkeypatch)
    with torch.no_grad():
        theirs = hf(ids, labels=ids, output_router_logits=True)
        ours = model(ids, labels=ids)

    assert (theirs.logits - ours.logits).abs().max().item() <= TOL
    assert ours.aux_loss.item() == pytest.approx(theirs.aux_loss.item(), abs=1e-6)
    assert ours.loss.item() == pytest.approx(theirs.loss.item(), abs=1e-5)
    # Identical top-k expert choices per token and layer, and counts that add up.
    for layer, hf_logits in enumerate(theirs.router_logits):
        hf_choice = hf_logits.float().softmax(-1).topk(top_k, dim=-1).indices
        assert torch.equal(hf_choice.sort(-1).values, routing[layer].sort(-1).values), f"layer {layer}"
        expected = torch.bincount(hf_choice.reshape(-1), minlength=experts).float()
        assert torch.equal(ours.expert_counts[layer], expected)


def test_left_padding_matches_transformers_and_is_excluded_from_statistics(tmp_path):
    hf = make_hf_model(tmp_path)
    model = moecpt.from_pretrained(tmp_path).eval()
    ids = torch.randint(1, 128, (3, 20), generator=torch.Generator().manual_seed(2))
    ours, real = compare_left_padding(hf, model, ids, TOL)
    assert not torch.isnan(ours.logits).any()
    # Every real token is counted top_k times per layer, padding not at all.
    assert ours.expert_counts.sum(dim=1).tolist() == [real.sum().item() * 2] * 2


def test_gradients_match_transformers(tmp_path):
    hf = make_hf_model(tmp_path)
    hf.train()
    model = moecpt.from_pretrained(tmp_path).train()
    ids = torch.randint(1, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    hf(ids, labels=ids, output_router_logits=True).loss.backward()
    model(ids, labels=ids).loss.backward()
    hf_params = dict(hf.named_parameters())
    pairs = {
        "layers.0.self_attn.q_proj.weight": "model.layers.0.self_attn.q_proj.weight",
        "layers.1.moe.gate.weight": "model.layers.1.mlp.gate.weight",
        "layers.1.moe.experts.gate_up_proj": "model.layers.1.mlp.experts.gate_up_proj",
        "layers.0.moe.experts.down_proj": "model.layers.0.mlp.experts.down_proj",
        "layers.0.input_layernorm.weight": "model.layers.0.input_layernorm.weight",
        "embed_tokens.weight": "model.embed_tokens.weight",
    }
    ours = dict(model.named_parameters())
    for mine, theirs in pairs.items():
        torch.testing.assert_close(ours[mine].grad, hf_params[theirs].grad, atol=1e-6, rtol=1e-4, msg=mine)


def test_stacked_transformers5_layout_loads(tmp_path):
    hf = make_hf_model(tmp_path / "hub")
    stacked = tmp_path / "stacked"
    stacked.mkdir()
    (stacked / "config.json").write_text((tmp_path / "hub" / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(stacked / "model.safetensors"))
    model = moecpt.from_pretrained(stacked).eval()
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids).logits).abs().max().item() <= TOL


@pytest.mark.parametrize("shard_size", ["5GB", "40KB"])
def test_round_trip_through_transformers(tmp_path, shard_size):
    from transformers import MixtralForCausalLM

    make_hf_model(tmp_path / "src", experts=8, top_k=2, heads=4, kv_heads=2)
    model = moecpt.from_pretrained(tmp_path / "src").eval()
    model.save_pretrained(tmp_path / "out", max_shard_size=shard_size)
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert (len(shards) > 1) == (shard_size == "40KB")

    reloaded, info = MixtralForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert reloaded.config.architectures == ["MixtralForCausalLM"]
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (reloaded.eval()(ids).logits - model(ids).logits).abs().max().item() <= TOL
    again = moecpt.from_pretrained(tmp_path / "out")
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)


def test_tied_round_trip_keeps_the_tie(tmp_path):
    from transformers import MixtralForCausalLM

    make_hf_model(tmp_path / "src", tied=True)
    model = moecpt.from_pretrained(tmp_path / "src")
    assert model.lm_head.weight is model.embed_tokens.weight
    model.save_pretrained(tmp_path / "out")
    reloaded, info = MixtralForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


def test_greedy_generation_matches_transformers_generate(tmp_path):
    hf = make_hf_model(tmp_path, experts=8)
    hf.config.output_router_logits = False  # transformers' generate cannot combine it with padding
    model = moecpt.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 128, (3, 15), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    mask[2, :2] = 0
    ids = ids.masked_fill(mask == 0, 0)
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0, eos_token_id=[])
    assert ours.tolist() == theirs.tolist()


def test_generation_stops_at_eos_and_pads(tmp_path):
    make_hf_model(tmp_path)
    model = moecpt.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(7))
    free = model.generate(ids, max_new_tokens=6, eos_token_id=[])
    stop_id = int(free[0, 10 + 2])  # the third token row 0 produces
    out = model.generate(ids, max_new_tokens=6, eos_token_id=stop_id, pad_token_id=0)
    row0 = out[0, 10:].tolist()
    first = row0.index(stop_id)
    assert first <= 2 and all(t == 0 for t in row0[first + 1:])
    # Until it stops, a row produces exactly what it produces without a stop id.
    assert out[0, : 10 + first + 1].tolist() == free[0, : 10 + first + 1].tolist()
