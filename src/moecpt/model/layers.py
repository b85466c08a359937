"""Blocks shared by the decoder families: RMSNorm, RoPE tables, a KV cache, grouped-query attention and the
attention mask of padded, packed or windowed batches.

Shapes in names: B batch, T tokens, H hidden, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moecpt.kernels.rmsnorm import rms_norm
from moecpt.kernels.rope import apply_rope


class RMSNorm(nn.Module):
    """Normalise in fp32, round to the input dtype, scale (transformers' rule); `fused`: one Triton kernel."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.fused = False  # set once by CausalLM.use_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, fused=self.fused)


def rope_cos_sin(positions_BT: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables for the given positions, in fp32 (never in bf16: long positions lose their precision)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions_BT.device, dtype=torch.float32) / head_dim))
    freqs_BTD = positions_BT.float()[..., None] * inv_freq
    emb = torch.cat((freqs_BTD, freqs_BTD), dim=-1)
    return emb.cos()[:, :, None], emb.sin()[:, :, None]  # [B, T, 1, D]: broadcast over heads


class KVCache:
    """Preallocated keys and values for every layer; `length` positions are filled."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    """Grouped-query attention with RoPE through SDPA (no biases: the Mixtral layout)."""

    def __init__(self, hidden: int, n_heads: int, n_kv: int, head_dim: int, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv, head_dim
        self.q_proj = nn.Linear(hidden, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, n_kv * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, n_kv * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=False)
        self.fused_rope = False  # set once by CausalLM.use_kernels

    def forward(self, x_BTH, cos, sin, mask, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x_BTH.shape
        # RoPE in the projections' [B, T, heads, D] layout, then [B, heads, T, D] for SDPA.
        q = apply_rope(self.q_proj(x_BTH).view(B, T, self.n_heads, self.head_dim), cos, sin, self.fused_rope)
        k = apply_rope(self.k_proj(x_BTH).view(B, T, self.n_kv, self.head_dim), cos, sin, self.fused_rope)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x_BTH).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def sdpa_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                   intra_doc: bool, past: int, window: int | None) -> torch.Tensor | None:
    """None for plain causal attention (SDPA's fastest path), else a boolean [B, 1, Tq, Tk] mask: causal,
    within `window` positions, not on padding (`attention_mask` 0), and with `intra_doc` within the document
    (a position 0 starts one)."""
    B, T = input_ids.shape
    needs_window = window is not None and past + T > window
    if attention_mask is None and not intra_doc and past == 0 and not needs_window:
        return None
    dev = input_ids.device
    q_idx = torch.arange(past, past + T, device=dev)[:, None]
    k_idx = torch.arange(past + T, device=dev)[None, :]
    allowed = (k_idx <= q_idx)[None]  # [1, Tq, Tk]
    if needs_window:
        allowed = allowed & (k_idx > q_idx - window)[None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, -(past + T):]
    if intra_doc:
        if past:
            raise ValueError("intra-document attention is not supported with a KV cache")
        doc = (position_ids == 0).cumsum(dim=1)
        allowed = allowed & (doc[:, :, None] == doc[:, None, :])
    # A query that may attend to nothing (a left-padding position) attends to itself instead of giving NaN.
    allowed = allowed | (k_idx == q_idx)[None]
    return allowed[:, None]
