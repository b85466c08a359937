"""Grouped-query attention with a mask repeats the kv heads (so that a masked fused kernel takes it on a GPU)
and gives what SDPA's own GQA gives."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moecpt.kernels.attention import sdpa


def test_masked_gqa_equals_sdpa_gqa_and_causal_path_is_unchanged(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 9, 8, generator=g) for h in (4, 2, 2))
    mask = torch.rand(2, 1, 9, 9, generator=g) > 0.3
    mask |= torch.eye(9, dtype=torch.bool)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kw):
        calls.append((args[1].shape[1], kw.get("attn_mask") is not None, kw.get("enable_gqa", False)))
        return real(*args, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    assert torch.allclose(sdpa(q, k, v, mask), want, atol=1e-6)
    causal = sdpa(q, k, v, None)
    assert calls == [(4, True, False), (2, False, True)]  # masked: repeated heads; causal: SDPA's GQA
    assert torch.allclose(causal, real(q, k, v, is_causal=True, enable_gqa=True), atol=1e-6)
