"""The SDPA backend preference changes no result: on a CPU it is a no-op, and a bad name is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moecpt.kernels.attention import SDPA_CHOICES, sdpa_backend


@pytest.mark.parametrize("name", SDPA_CHOICES)
def test_attention_math_is_unchanged_on_cpu(name):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 8, generator=g)
    k, v = torch.randn(2, 2, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    with sdpa_backend(name, "cpu"):
        got = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(got, want)
    scores = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) / 8**0.5
    scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(got, scores.softmax(-1) @ v.repeat_interleave(2, dim=1), rtol=1e-5, atol=1e-6)


def test_model_forward_is_unchanged_under_a_preference():
    from moecpt.model import MixtralForCausalLM
    from moecpt.model.config import MixtralConfig

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig.from_preset("tiny", vocab_size=97, hidden_size=32,
                                                         intermediate_size=48)).eval()
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        want = model(ids).logits
        with sdpa_backend("cudnn", "cpu"):
            assert torch.equal(model(ids).logits, want)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown SDPA backend"), sdpa_backend("fastest"):
        pass


@pytest.mark.parametrize("name", SDPA_CHOICES)
def test_the_cuda_preference_can_be_entered_and_leaves_cpu_results_alone(name):
    """The CUDA branch (sdpa_kernel with a priority order) runs here too; CPU inputs give the same result."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 7, 8, generator=g) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with sdpa_backend(name, "cuda"):
        got = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
