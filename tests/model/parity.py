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
    depth = [0]  # a subclass's forward that calls Router.forward records once

    def wrap(original):
        def route(self, x):
            depth[0] += 1
            try:
                out = original(self, x)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                seen.append(out[3].detach().clone())
            return out
        return route

    for cls in (moe_module.Router, *moe_module.Router.__subclasses__()):
        if "forward" in vars(cls):  # families with a router of their own (gpt-oss)
            monkeypatch.setattr(cls, "forward", wrap(vars(cls)["forward"]))
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


def compare_left_padding(hf, model, ids: torch.Tensor, tol: float):
    """Rows 0 and 1 of `ids` [3, T] left-padded by 7 and 1 positions: logits on the real tokens within `tol` of
    transformers' and the same load-balancing loss. Returns moecpt's output and the real-token mask."""
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    mask[1, :1] = 0
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, output_router_logits=True)
        ours = model(ids, attention_mask=mask)
    real = mask.bool()
    assert (theirs.logits[real] - ours.logits[real]).abs().max().item() <= tol
    assert ours.aux_loss.item() == pytest.approx(theirs.aux_loss.item(), abs=1e-6)
    return ours, real


def assert_missing_tensor_refused(hf_dir: Path, tensors: dict[str, torch.Tensor], victim: str) -> None:
    """Save `tensors` without `victim` as the directory's weights: loading is refused, naming that one missing
    tensor, and nothing is loaded."""
    from safetensors.torch import save_file

    from moecpt import from_pretrained
    from moecpt.errors import UserError

    assert victim in tensors, victim
    save_file({k: v for k, v in tensors.items() if k != victim}, str(Path(hf_dir) / "model.safetensors"))
    with pytest.raises(UserError) as e:
        from_pretrained(hf_dir)
    assert "missing (1)" in str(e.value) and victim in str(e.value) and "nothing was loaded" in str(e.value)


def compare_gradients(hf, model, ids: torch.Tensor, hf_name, tol: float, to_ours=None) -> None:
    """Backward of the labels loss through both: every moecpt parameter has a gradient within `tol` of
    transformers' (`hf_name` maps moecpt's name to transformers' in-memory one; `to_ours(name, grad)`, where
    given, lays transformers' gradient out as moecpt's parameter), and every transformers parameter is matched
    (tied ones once)."""
    hf.train()(ids, labels=ids, output_router_logits=True).loss.backward()
    model.train()(ids, labels=ids).loss.backward()
    theirs = dict(hf.named_parameters())
    ours = dict(model.named_parameters())
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    assert {hf_name(n) for n in ours} == set(theirs) - tied
    for name, p in ours.items():
        assert p.grad is not None and theirs[hf_name(name)].grad is not None, name
        assert p.grad.abs().max().item() > 0, name  # every parameter takes part
        expected = theirs[hf_name(name)].grad
        expected = expected if to_ours is None else to_ours(name, expected)
        torch.testing.assert_close(p.grad, expected, atol=tol, rtol=0, msg=name)


def compare_generation(hf, model, ids: torch.Tensor, pad_rows: dict[int, int], new_tokens: int = 12) -> None:
    """Greedy generation of left-padded prompts (row -> padded positions) is token-identical."""
    hf.config.output_router_logits = False  # transformers' generate cannot combine it with padding
    mask = torch.ones_like(ids)
    for row, n in pad_rows.items():
        mask[row, :n] = 0
    ids = ids.masked_fill(mask == 0, 0)
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    ours = model.eval().generate(ids, attention_mask=mask, max_new_tokens=new_tokens, pad_token_id=0,
                                 eos_token_id=[])
    assert ours.shape == (ids.shape[0], ids.shape[1] + new_tokens)
    assert ours.tolist() == theirs.tolist()
