"""The experts' SwiGLU activation, silu(gate) * up, as one Triton kernel each way.

Input is the first grouped GEMM's output [N, 2F] (gate columns, then up columns, transformers' `gate_up_proj`
layout); output [N, F]. The reference `F.silu(gate) * up` runs two kernels forward and three backward over
tensors of the expert width; the fused one reads [N, 2F] once and writes [N, F] once, and its backward writes
the [N, 2F] gradient in one pass. Values are computed in fp32 and rounded once to the input dtype.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F

BLOCK = 1024  # columns per program


def swiglu_reference(h_N2F: torch.Tensor) -> torch.Tensor:
    gate, up = h_N2F.chunk(2, dim=-1)
    return F.silu(gate) * up


@functools.cache
def _kernels() -> SimpleNamespace:
    import triton
    import triton.language as tl

    @triton.jit
    def fwd(Hp, Y, F, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < F
        g = tl.load(Hp + row * 2 * F + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(Hp + row * 2 * F + F + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + row * F + cols, (g * tl.sigmoid(g) * u).to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def bwd(Hp, DY, DH, F, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < F
        g = tl.load(Hp + row * 2 * F + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(Hp + row * 2 * F + F + cols, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * F + cols, mask=m, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        dg = dy * u * s * (1.0 + g * (1.0 - s))  # d silu(g) / dg = s (1 + g (1 - s))
        tl.store(DH + row * 2 * F + cols, dg.to(DH.dtype.element_ty), mask=m)
        tl.store(DH + row * 2 * F + F + cols, (dy * g * s).to(DH.dtype.element_ty), mask=m)

    return SimpleNamespace(fwd=fwd, bwd=bwd)


def _grid(n: int, f: int) -> tuple[int, int]:
    return n, -(-f // BLOCK)


@torch.library.custom_op("moecpt::swiglu_fwd", mutates_args=())
def _swiglu_fwd(h: torch.Tensor) -> torch.Tensor:
    h = h.contiguous()
    N, F2 = h.shape
    y = h.new_empty(N, F2 // 2)
    if N:
        _kernels().fwd[_grid(N, F2 // 2)](h, y, F2 // 2, BLOCK=BLOCK)
    return y


@_swiglu_fwd.register_fake
def _(h):
    return h.new_empty(h.shape[0], h.shape[1] // 2)


@torch.library.custom_op("moecpt::swiglu_bwd", mutates_args=())
def _swiglu_bwd(dy: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    h, dy = h.contiguous(), dy.contiguous()
    dh = torch.empty_like(h)
    N, F2 = h.shape
    if N:
        _kernels().bwd[_grid(N, F2 // 2)](h, dy, dh, F2 // 2, BLOCK=BLOCK)
    return dh


@_swiglu_bwd.register_fake
def _(dy, h):
    return h.new_empty(h.shape)  # contiguous, as the kernel's output


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, dy):
    return _swiglu_bwd(dy, ctx.saved_tensors[0])


_swiglu_fwd.register_autograd(_backward, setup_context=_setup)


def swiglu(h_N2F: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """silu(gate) * up of a [N, 2F] gate|up tensor; with `fused` (chosen once where the model is built) the
    Triton kernel."""
    if fused and h_N2F.dim() == 2:
        return _swiglu_fwd(h_N2F)
    return swiglu_reference(h_N2F)
