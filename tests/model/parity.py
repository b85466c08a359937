"""What the family parity tests share: random transformers checkpoints with norms and biases moved away from
transformers' 1 and 0 (so a swapped or dropped one shows), the routing moecpt chooses, and the comparison of
one forward pass against transformers'."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moecpt.model import moe as moe_module


def save_perturbed(model_cls, config, path: Path, seed: int = 0):
    """A random transformers model of `config`, its norms and biases perturbed, saved to `path` with
    transformers' own save_pretrained; returned in eval mode."""
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def random_ids(shape: tuple[int, ...], seed: int, vocab: int) -> torch.Tensor:
    return torch.randint(1, vocab, shape, generator=torch.Generator().manual_seed(seed))


def capture_routing(monkeypatch) -> list[torch.Tensor]:
    """The top-k experts every moecpt MoE layer chooses, in call order."""
    seen: list[torch.Tensor] = []
    original = moe_module.Router.forward

    def route(self, x):
        out = original(self, x)
        seen.append(out[3].detach().clone())
        return out

    monkeypatch.setattr(moe_module.Router, "forward", route)
    return seen


def fused_name(name: str) -> str:
    """transformers 5's in-memory (fused) name of a moecpt parameter of the Qwen and OLMoE families."""
    return name if name == "lm_head.weight" else "model." + name.replace(".moe.", ".mlp.")


def compare_forward(hf, model, ids: torch.Tensor, monkeypatch, tol: float):
    """One forward with labels through both: logits within `tol`, the cross-entropy + balancing loss and the
    balancing loss equal, and per MoE layer the same experts per token and expert counts. Returns both outputs."""
    routing = capture_routing(monkeypatch)
    with torch.no_grad():
        theirs = hf(ids, labels=ids, output_router_logits=True)
        ours = model(ids, labels=ids)
    assert (theirs.logits - ours.logits).abs().max().item() <= tol
    assert ours.aux_loss.item() == pytest.approx(theirs.aux_loss.item(), abs=1e-6)
    assert ours.loss.item() - model.config.router_z_loss_coef * ours.z_loss.item() == pytest.approx(
        theirs.loss.item(), abs=1e-5)
    assert len(theirs.router_logits) == len(routing)  # the MoE layers only
    c = model.config
    for layer, hf_logits in enumerate(theirs.router_logits):
        hf_choice = hf_logits.float().softmax(-1).topk(c.top_k, dim=-1).indices
        assert torch.equal(hf_choice.sort(-1).values, routing[layer].sort(-1).values), f"MoE layer {layer}"
        expected = torch.bincount(hf_choice.reshape(-1), minlength=c.n_experts).float()
        assert torch.equal(ours.expert_counts[layer], expected), f"MoE layer {layer}"
    return theirs, ours
