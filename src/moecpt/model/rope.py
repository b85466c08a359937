"""Rotary position embeddings with YaRN context extension (arXiv 2309.00071), as gpt-oss and DeepSeek-V3 use
them: the frequencies interpolated by `factor` below a ramp between `beta_slow` and `beta_fast` rotations (over
the original context) and kept above it, and cos/sin multiplied by an attention factor.

The formulas follow transformers' `_compute_yarn_parameters` so that the tables are the same to the bit:
- the attention factor, unless given, is 0.1 ln(factor) + 1, or with both `mscale` and `mscale_all_dim` the
  ratio of the two such terms (DeepSeek, whose ratio is 1 and who corrects the softmax scale instead: see
  `yarn_mscale`);
- a `factor` of None means max_position_embeddings / original_max_position_embeddings;
- `truncate` rounds the ramp's ends to whole dimensions (gpt-oss sets it false).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from moecpt.errors import UserError


@dataclass(frozen=True)
class Yarn:
    factor: float | None
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> Yarn:
        """A `rope_parameters` / `rope_scaling` dict of rope_type "yarn" (rope_theta and rope_type ignored)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"rope_type", "type", "rope_theta", "partial_rotary_factor"})
        if unknown:
            raise UserError(f"{source}: YaRN rope parameter(s) {', '.join(unknown)} are not supported")
        if d.get("partial_rotary_factor", 1.0) != 1.0:
            raise UserError(f"{source}: partial_rotary_factor {d['partial_rotary_factor']} is not supported")
        if "original_max_position_embeddings" not in d:
            raise UserError(f"{source}: YaRN rope parameters need original_max_position_embeddings")
        kw = {k: v for k, v in d.items() if k in known}
        for k in ("beta_fast", "beta_slow"):  # transformers: a missing or null beta takes the default
            if kw.get(k) is None:
                kw.pop(k, None)
        y = cls(**kw)
        if y.factor is not None and y.factor <= 0:
            raise UserError(f"{source}: YaRN factor must be positive, got {y.factor}")
        return y

    def to_hf(self) -> dict[str, Any]:
        """The rope parameters as config.json holds them (rope_theta is the config's to add)."""
        return {"rope_type": "yarn"} | {k: v for k, v in asdict(self).items() if v is not None}


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """0.1 * mscale * ln(scale) + 1 (1 for scale <= 1): YaRN's attention temperature term."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_factor(yarn: Yarn, max_position_embeddings: int | None) -> float:
    """The interpolation factor (a null factor: the ratio of the context to the original one)."""
    if yarn.factor is not None:
        return yarn.factor
    if not max_position_embeddings:
        raise UserError("YaRN with a null factor needs max_position_embeddings")
    return max_position_embeddings / yarn.original_max_position_embeddings


def inv_freq(head_dim: int, theta: float, yarn: Yarn | None = None, max_position_embeddings: int | None = None,
             device: torch.device | str | None = None) -> tuple[torch.Tensor, float]:
    """The inverse frequencies [head_dim / 2] (fp32, computed on `device`: no host-to-device copy in a
    forward) and the factor cos/sin are multiplied by."""
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    if yarn is None:
        return 1.0 / pos_freqs, 1.0
    factor = yarn_factor(yarn, max_position_embeddings)
    attention = yarn.attention_factor
    if attention is None:
        attention = (yarn_mscale(factor, yarn.mscale) / yarn_mscale(factor, yarn.mscale_all_dim)
                     if yarn.mscale and yarn.mscale_all_dim else yarn_mscale(factor))
    low, high = _correction_range(yarn, head_dim, theta)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1 where a dimension keeps its frequency, 0 where it is interpolated
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, float(attention)


def _correction_range(yarn: Yarn, dim: int, theta: float) -> tuple[float, float]:
    """The dimensions between which the ramp runs: where a dimension turns beta_fast / beta_slow times over the
    original context."""
    def dim_of(rotations: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(yarn.beta_fast or 32), dim_of(yarn.beta_slow or 1)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def rope_tables(positions_BT: torch.Tensor, head_dim: int, theta: float, yarn: Yarn | None = None,
                max_position_embeddings: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, T, 1, head_dim] (fp32, never bf16: long positions would lose their precision) of the
    positions: the two halves of the head share each frequency (the layout `moecpt.kernels.rope.apply_rope`
    rotates), times the YaRN attention factor. Without `yarn`: the default RoPE."""
    inv, attention = inv_freq(head_dim, theta, yarn, max_position_embeddings, positions_BT.device)
    freqs_BTD = positions_BT.float()[..., None] * inv
    emb = torch.cat((freqs_BTD, freqs_BTD), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if attention != 1.0:
        cos, sin = cos * attention, sin * attention
    return cos[:, :, None], sin[:, :, None]
