"""RMSNorm as one Triton kernel each way, beside the plain PyTorch reference the model uses elsewhere.

The reference (`rms_norm_reference`, transformers' Mixtral rule): normalise in fp32, round to the input's
dtype, multiply by the weight. In eager PyTorch that is five or six kernels and as many trips through memory
per norm; the fused version reads the row once and writes it once, and its backward does the same (the weight
gradient is summed per block of rows, then over blocks). Both are wrapped as custom ops, so `torch.compile`
sees one opaque op and never breaks its graph on a Triton launch.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from moecpt.kernels.support import row_block, warps_for


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@functools.cache
def _kernels() -> SimpleNamespace:
    """Defined on first use, so that TRITON_INTERPRET set by then is honoured."""
    import triton
    import triton.language as tl

    @triton.jit
    def fwd(X, W, Y, RSTD, H, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < H
        x = tl.load(X + row * H + cols, mask=m, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
        n = (x * rstd).to(X.dtype.element_ty).to(tl.float32)  # rounded to the input dtype, as the reference
        w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + row * H + cols, (w * n).to(Y.dtype.element_ty), mask=m)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def bwd(X, W, DY, RSTD, DX, DW_PART, M, H, rows_per_program, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < H
        w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        first = pid.to(tl.int64) * rows_per_program
        for i in range(0, rows_per_program):
            row = first + i
            mr = m & ((cols * 0 + row) < M)  # the last program may have fewer rows
            x = tl.load(X + row * H + cols, mask=mr, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * H + cols, mask=mr, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row, mask=row < M, other=0.0)
            n = x * rstd
            dyw = dy * w
            dx = rstd * (dyw - n * (tl.sum(dyw * n, axis=0) / H))
            tl.store(DX + row * H + cols, dx.to(DX.dtype.element_ty), mask=mr)
            dw += dy * n.to(X.dtype.element_ty).to(tl.float32)
        tl.store(DW_PART + pid * H + cols, dw, mask=m)

    return SimpleNamespace(fwd=fwd, bwd=bwd)


@torch.library.custom_op("moecpt::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    H = x.shape[-1]
    x2 = x.reshape(-1, H).contiguous()
    y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    if x2.shape[0]:
        _kernels().fwd[(x2.shape[0],)](x2, weight.contiguous(), y, rstd, H, eps, BLOCK=row_block(H),
                                        num_warps=warps_for(row_block(H)))
    return y.view(*x.shape[:-1], H), rstd


@_rms_norm_fwd.register_fake
def _(x, weight, eps):
    y = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
    return y, x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32)


@torch.library.custom_op("moecpt::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                  rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    H = x.shape[-1]
    x2 = x.reshape(-1, H).contiguous()
    dy2 = dy.reshape(-1, H).contiguous()
    M = x2.shape[0]
    dx = torch.empty_like(x2)
    programs = max(1, min(M, 4 * _sm_count(x.device)))
    rows_per_program = -(-M // programs) if M else 1
    dw_part = torch.zeros(programs, H, dtype=torch.float32, device=x.device)
    if M:
        _kernels().bwd[(programs,)](x2, weight.contiguous(), dy2, rstd, dx, dw_part, M, H, rows_per_program,
                                    BLOCK=row_block(H), num_warps=warps_for(row_block(H)))
    return dx.view(x.shape), dw_part.sum(0).to(weight.dtype)


@_rms_norm_bwd.register_fake
def _(dy, x, weight, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)  # contiguous, as the kernel's outputs


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few programs, each looping over rows


def _setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_bwd(dy, x, weight, rstd)
    return dx, dw, None


_rms_norm_fwd.register_autograd(_backward, setup_context=_setup)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fused: bool = False) -> torch.Tensor:
    """RMSNorm of the last dimension times `weight`; with `fused` (chosen once where the model is built, see
    `support.triton_usable`) the Triton kernel."""
    if fused:
        return _rms_norm_fwd(x, weight, eps)[0]
    return rms_norm_reference(x, weight, eps)
