"""Which fused kernel runs `F.scaled_dot_product_attention` on a GPU (a preference, never a different result),
and attention with sinks (gpt-oss) as an exact SDPA call beside its fp32 reference.

`sdpa_backend("cudnn")` puts cuDNN attention first, then flash, memory-efficient and math (PyTorch falls back
along that list where a backend cannot take the inputs, e.g. an explicit mask); "auto" leaves PyTorch's own
choice. On a CPU every choice is PyTorch's own: the math is the same kernel-free SDPA either way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from moecpt.config import SDPA_CHOICES

_FALLBACK = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
FIRST = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
         "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


@contextlib.contextmanager
def sdpa_backend(name: str, device: torch.device | str | None = None) -> Iterator[None]:
    """Prefer SDPA backend `name` (auto | cudnn | flash | efficient | math) inside the block, on CUDA only."""
    if name not in SDPA_CHOICES:
        raise ValueError(f"unknown SDPA backend {name!r}; choose one of {', '.join(SDPA_CHOICES)}")
    device_type = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available()
                                                                          else "cpu")
    if name == "auto" or device_type != "cuda":
        yield
        return
    order = [FIRST[name], *(b for b in _FALLBACK if b != FIRST[name])]
    with sdpa_kernel(order, set_priority=True):
        yield


# ---- attention with sinks (gpt-oss) ---------------------------------------------------------------------
# A sink is a learned logit per query head that joins the softmax's denominator and contributes no value:
#     out_i = sum_j exp(s_ij) v_j / (sum_j exp(s_ij) + exp(sink_h)).
# SDPA takes no sinks, so `sink_attention` gives SDPA one more key whose value is zero and whose logit is the
# sink: the head dimension of q and k grows by SINK_PAD (a multiple of 8, which fused kernels want), q's first
# extra entry is sink_h / scale, k's extra entries are 0 for the real keys and (1, 0, ...) for the sink key.
# Then q.k is unchanged for the real keys and equals sink_h / scale for the sink key: the same softmax, exactly
# (up to rounding), and the sinks' gradient flows through q. `sink_attention_reference` is the plain fp32
# formula (transformers' eager gpt-oss attention) that tests hold it to.
SINK_PAD = 8


def causal_mask(t_q: int, t_k: int, device: torch.device) -> torch.Tensor:
    """[1, 1, Tq, Tk] boolean: query i (the last Tq of Tk positions) sees keys up to its own position."""
    q_idx = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    return (torch.arange(t_k, device=device)[None, :] <= q_idx)[None, None]


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                   mask: torch.Tensor | None, scale: float | None = None) -> torch.Tensor:
    """Attention with one sink logit per query head, through SDPA. q [B, h, Tq, D], k and v [B, hk, Tk, D]
    (GQA when hk < h), sinks [h], mask: boolean [B or 1, 1, Tq, Tk] (True = may attend) or None for causal.
    Returns [B, h, Tq, D]."""
    B, h, t_q, D = q.shape
    hk, t_k = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    sink_q = (sinks.to(q.dtype) / scale).view(1, h, 1, 1).expand(B, h, t_q, 1)
    q_ = torch.cat([q, sink_q, q.new_zeros(B, h, t_q, SINK_PAD - 1)], dim=-1)
    sink_k = k.new_zeros(B, hk, 1, D + SINK_PAD)
    sink_k[..., D] = 1.0
    k_ = torch.cat([torch.cat([k, k.new_zeros(B, hk, t_k, SINK_PAD)], dim=-1), sink_k], dim=2)
    v_ = torch.cat([v, v.new_zeros(B, hk, 1, v.shape[-1])], dim=2)
    if mask is None:
        mask = causal_mask(t_q, t_k, q.device)
    mask = torch.cat([mask, mask.new_ones(*mask.shape[:-1], 1)], dim=-1)
    return sdpa(q_, k_, v_, mask, scale)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
         scale: float | None = None) -> torch.Tensor:
    """SDPA with grouped-query heads (k and v [B, hk, Tk, D], hk dividing q's heads), causal when `mask` is
    None. On CUDA, SDPA runs GQA only in the flash kernel (which takes no mask) or the math one (O(T^2) fp32
    scores): with a mask, the kv heads are repeated instead so that a masked fused kernel takes the call."""
    h, hk = q.shape[1], k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=hk != h)
    if hk != h:
        k, v = k.repeat_interleave(h // hk, dim=1), v.repeat_interleave(h // hk, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def sink_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                             mask: torch.Tensor | None, scale: float | None = None) -> torch.Tensor:
    """The plain formula in fp32 (the arguments of `sink_attention`), for tests."""
    B, h, t_q, D = q.shape
    rep = h // k.shape[1]
    k, v = k.float().repeat_interleave(rep, dim=1), v.float().repeat_interleave(rep, dim=1)
    logits = q.float() @ k.transpose(-2, -1) * (D ** -0.5 if scale is None else scale)
    if mask is None:
        mask = causal_mask(t_q, k.shape[2], q.device)
    logits = logits.masked_fill(~mask, float("-inf"))
    both = torch.cat([logits, sinks.float().view(1, h, 1, 1).expand(B, h, t_q, 1)], dim=-1)
    probs = both.softmax(dim=-1)[..., :-1]
    return (probs @ v).to(q.dtype)
