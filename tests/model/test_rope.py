"""YaRN RoPE tables against transformers' rotary embeddings (bit for bit), and the rope parameters of a
config.json read and written back."""

from __future__ import annotations

import pytest
import torch

from moecpt.errors import UserError
from moecpt.model.rope import Yarn, rope_tables, yarn_mscale

transformers = pytest.importorskip("transformers")

CASES = {
    # gpt-oss: no truncation, the factor's own attention temperature.
    "gpt-oss": dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                    original_max_position_embeddings=64),
    # DeepSeek-V3: mscale = mscale_all_dim (an attention factor of 1), truncated ramp.
    "deepseek": dict(rope_type="yarn", factor=40.0, beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0,
                     original_max_position_embeddings=32),
    # A null factor: the ratio of the contexts; an explicit attention factor.
    "null-factor": dict(rope_type="yarn", factor=None, attention_factor=0.7, original_max_position_embeddings=16),
}


def hf_tables(params: dict, head_dim: int, theta: float, positions: torch.Tensor):
    """transformers' cos/sin for these rope parameters (through a Llama rotary embedding, which takes any
    rope type)."""
    config = transformers.LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                                      max_position_embeddings=256,
                                      rope_parameters=params | {"rope_theta": theta})
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    x = torch.zeros(1, dtype=torch.float32)
    return rotary(x, positions)


@pytest.mark.parametrize("case", sorted(CASES))
def test_yarn_tables_equal_transformers(case):
    params = CASES[case]
    positions = torch.arange(0, 200, 3)[None]
    yarn = Yarn.from_hf(params)
    cos, sin = rope_tables(positions, 16, 150000.0, yarn, max_position_embeddings=256)
    hcos, hsin = hf_tables(params, 16, 150000.0, positions)
    assert torch.equal(cos[:, :, 0], hcos) and torch.equal(sin[:, :, 0], hsin)


def test_default_rope_equals_transformers():
    positions = torch.arange(50)[None]
    cos, sin = rope_tables(positions, 8, 10000.0)
    hcos, hsin = hf_tables({"rope_type": "default"}, 8, 10000.0, positions)
    assert torch.equal(cos[:, :, 0], hcos) and torch.equal(sin[:, :, 0], hsin)


def test_yarn_parameters_round_trip_and_refusals():
    params = CASES["deepseek"]
    assert Yarn.from_hf(Yarn.from_hf(params).to_hf()) == Yarn.from_hf(params)
    with pytest.raises(UserError, match="original_max_position_embeddings"):
        Yarn.from_hf({"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(UserError, match="low_freq_factor"):
        Yarn.from_hf({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
                      "low_freq_factor": 1})
    assert yarn_mscale(1.0) == 1.0 and yarn_mscale(40.0, 1.0) == pytest.approx(1 + 0.1 * 3.6888794541139363)
