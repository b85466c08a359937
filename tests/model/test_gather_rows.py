"""The MoE permutation's gather: same rows as indexing, and a gather-only backward equal to indexing's."""

from __future__ import annotations

import pytest
import torch

from moecpt.model.moe import gather_rows


def routing(T: int, E: int, K: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    experts_TK = torch.rand(T, E, generator=g).topk(K, dim=-1).indices
    flat = experts_TK.reshape(-1)
    order = flat.argsort(stable=True)
    inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))
    return order, inv


@pytest.mark.parametrize("K", [1, 2, 3])
def test_dispatch_and_combine_match_plain_indexing(K):
    T, H = 11, 6
    order, inv = routing(T, 5, K)
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    rows = gather_rows(x, order // K, inv, K)
    rows_ref = x_ref[order // K]
    assert torch.equal(rows, rows_ref)
    back = gather_rows(rows, inv, order, 1)  # the combine's unpermute: every routed row back in token order
    back_ref = rows_ref[inv]
    assert torch.equal(back, back_ref)
    assert torch.equal(back.view(T, K, H)[:, 0], x.detach())
    g = torch.randn(T * K, H, dtype=torch.float64)
    (back * g).sum().backward()
    (back_ref * g).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, rtol=0, atol=1e-12)


def test_cast_before_the_copy_sums_gradients_in_fp32():
    T, H, K = 64, 8, 2
    order, inv = routing(T, 4, K, seed=1)
    x = torch.randn(T, H, requires_grad=True)
    rows = gather_rows(x, order // K, inv, K, torch.bfloat16)
    assert rows.dtype == torch.bfloat16 and torch.equal(rows, x.detach().to(torch.bfloat16)[order // K])
    g = torch.randn(T * K, H).to(torch.bfloat16)
    rows.backward(g)
    assert x.grad.dtype == torch.float32
    # each token's gradient is the exact fp32 sum of its K copies' bf16 gradients
    expected = g.float()[inv].view(T, K, H).sum(1)
    assert torch.equal(x.grad, expected)
