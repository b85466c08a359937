"""Rotary position embedding of queries or keys as one Triton kernel each way.

Layout [B, T, heads, D], the projections' own output before the transpose SDPA wants, with the fp32 tables
`moecpt.model.rope.rope_tables` gives ([B, T, 1, D], the two halves equal). The reference upcasts, splits, concatenates,
multiplies and adds (six kernels and an fp32 copy of q or k); the fused one reads each row once, rotates in
fp32 and writes it once. Backward is the rotation by the opposite angle.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from moecpt.kernels.support import row_block


def rope_reference(x_BTND: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x_BTND.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).to(x_BTND.dtype)


@functools.cache
def _kernels() -> SimpleNamespace:
    import triton
    import triton.language as tl

    @triton.jit
    def rotate(X, COS, SIN, Y, n_heads, D, sign, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        """One (b, t) row: all heads. sign +1 rotates forward, -1 backward (the transpose)."""
        row = tl.program_id(0).to(tl.int64)
        half = D // 2
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        m = (h < n_heads) & (d < half)
        c = tl.load(COS + row * D + d, mask=d < half, other=0.0)
        s = tl.load(SIN + row * D + d, mask=d < half, other=0.0) * sign
        base = row * n_heads * D + h * D + d
        x1 = tl.load(X + base, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(X + base + half, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + base, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=m)
        tl.store(Y + base + half, (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=m)

    return SimpleNamespace(rotate=rotate)


def _run(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    B, T, n, D = x.shape
    x = x.contiguous()
    cos = cos.expand(B, T, 1, D).float().contiguous()
    sin = sin.expand(B, T, 1, D).float().contiguous()
    y = torch.empty_like(x)
    if x.numel():
        _kernels().rotate[(B * T,)](x, cos, sin, y, n, D, sign, BLOCK_H=row_block(n), BLOCK_D=row_block(D // 2))
    return y


@torch.library.custom_op("moecpt::rope", mutates_args=())
def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    return _run(x, cos, sin, sign)


@_rope.register_fake
def _(x, cos, sin, sign):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    _, cos, sin, sign = inputs
    ctx.save_for_backward(cos, sin)
    ctx.sign = sign


def _backward(ctx, dy):
    cos, sin = ctx.saved_tensors
    return _rope(dy, cos, sin, -ctx.sign), None, None, None


_rope.register_autograd(_backward, setup_context=_setup)


def apply_rope(x_BTND: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """Rotate queries or keys [B, T, heads, D] by the fp32 tables [B, T, 1, D] of `moecpt.model.rope.rope_tables`; the Triton
    kernel with `fused` (chosen once where the model is built), else the reference."""
    if fused and x_BTND.dim() == 4:
        return _rope(x_BTND, cos, sin, 1.0)
    return rope_reference(x_BTND, cos, sin)
