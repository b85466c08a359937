"""Blocks shared by the decoder families: RMSNorm, a KV cache, grouped-query attention and the
attention mask of padded, packed or windowed batches.

Shapes in names: B batch, T tokens, H hidden, D head dim.
"""

from __future__ import annotations

import torch
from torch import nn

from moecpt.kernels.attention import sdpa, sink_attention
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
    """Grouped-query attention with RoPE through SDPA, with the options the families use:
    - `qkv_bias` / `o_bias`: biases on the q, k, v and the output projections (Qwen2-MoE: qkv only);
    - `qk_norm`: RMSNorm of queries and keys before RoPE, "head" (over each head's D, Qwen3) or "full"
      (over the whole projection, OLMoE);
    - `clip_qkv`: clamp q, k and v to [-c, c] after the norms (OLMoE);
    - `window`: sliding-window attention over that many positions (None: full causal);
    - `sinks`: a learned logit per head in the softmax's denominator (gpt-oss; `kernels.attention`)."""

    def __init__(self, hidden: int, n_heads: int, n_kv: int, head_dim: int, layer: int, qkv_bias: bool = False,
                 o_bias: bool = False, qk_norm: str | None = None, norm_eps: float = 1e-6,
                 clip_qkv: float | None = None, window: int | None = None, sinks: bool = False):
        super().__init__()
        self.layer, self.window, self.clip_qkv, self.qk_norm = layer, window, clip_qkv, qk_norm
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv, head_dim
        self.q_proj = nn.Linear(hidden, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, n_kv * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, n_kv * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=o_bias)
        if qk_norm is not None:
            if qk_norm not in ("head", "full"):
                raise ValueError(f"qk_norm {qk_norm!r}: choose head, full or None")
            self.q_norm = RMSNorm(head_dim if qk_norm == "head" else n_heads * head_dim, norm_eps)
            self.k_norm = RMSNorm(head_dim if qk_norm == "head" else n_kv * head_dim, norm_eps)
        if sinks:
            self.sinks = nn.Parameter(torch.empty(n_heads))
        self.fused_rope = False  # set once by CausalLM.use_kernels

    def project(self, x_BTH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, T, heads, D], k and v [B, T, kv heads, D], normed and clipped, before RoPE."""
        B, T, _ = x_BTH.shape
        q, k, v = self.q_proj(x_BTH), self.k_proj(x_BTH), self.v_proj(x_BTH)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(B, T, self.n_heads, self.head_dim), k.view(B, T, self.n_kv, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        return q, k, v.view(B, T, self.n_kv, self.head_dim)

    def forward(self, x_BTH, cos, sin, mask, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x_BTH.shape
        q, k, v = self.project(x_BTH)
        # RoPE in the projections' [B, T, heads, D] layout, then [B, heads, T, D] for SDPA.
        q = apply_rope(q, cos, sin, self.fused_rope).transpose(1, 2)
        k = apply_rope(k, cos, sin, self.fused_rope).transpose(1, 2)
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        if hasattr(self, "sinks"):
            out = sink_attention(q, k, v, self.sinks, mask)
        else:
            out = sdpa(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class DecoderLayer(nn.Module):
    """x + attention(norm(x)), then + feed-forward(norm(x)): a sparse MoE block (`moe`, with router
    statistics) or a dense MLP (`mlp`, the dense layers among MoE ones)."""

    def __init__(self, hidden: int, eps: float, attention: Attention, ffn: nn.Module, sparse: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = attention
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        if sparse:
            self.moe = ffn
        else:
            self.mlp = ffn

    def forward(self, x, cos, sin, mask, token_mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        h = self.post_attention_layernorm(x)
        if hasattr(self, "moe"):
            out, stats = self.moe(h, token_mask)
            return x + out, stats
        return x + self.mlp(h), None


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
