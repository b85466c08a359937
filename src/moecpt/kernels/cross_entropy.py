"""LM head + cross-entropy without the full [tokens, vocab] logits: the training loss of a large vocabulary.

`linear_cross_entropy_reference` is the plain computation the model's forward does with logits (the head's
matmul, logits upcast to fp32, `F.cross_entropy` per token). `linear_cross_entropy` gives the same per-token
losses and the same gradients, but runs the head and the loss over `chunk_tokens` tokens at a time and keeps
no logits for backward: backward recomputes each chunk's logits (one extra head matmul forward, about 3% of a
bench-1b step) and frees them before the next chunk. At bench-1b (16,384 tokens x 32,000 pieces) the plain
path holds ~5 GiB of logits and their gradients at once; the chunked one ~0.8 GiB at 2,048 tokens a chunk.

With `fused` (and Triton usable on the device) each chunk's loss comes from a Triton kernel that reads the
logits in their own dtype once (an online logsumexp), instead of an fp32 copy, a log-softmax and a gather; the
backward kernel writes the logits' gradient (softmax - one-hot, times the incoming gradient) over the
recomputed logits in place, so a chunk never has an fp32 [tokens, vocab] tensor at all.

Autocast is honoured the way `nn.Linear` under autocast does it: the head runs in the autocast dtype, the loss
in fp32. The weight is used as a plain tensor: with FSDP2 the LM head must belong to a unit that is gathered
during the forward (moecpt's root unit, which also keeps it gathered for backward), not to a unit of its own.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from moecpt.config import CHUNK_TOKENS, IGNORE_INDEX
from moecpt.kernels.support import row_block, warps_for


def linear_cross_entropy_reference(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, targets_N: torch.Tensor,
                                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-token fp32 cross-entropy of `hidden @ weight.T` against `targets` (0 where ignored), all at once."""
    logits_NV = F.linear(hidden_NH, weight_VH)
    return F.cross_entropy(logits_NV.float(), targets_N, ignore_index=ignore_index, reduction="none")


def _chunk_loss(h_CH: torch.Tensor, w_VH: torch.Tensor, t_C: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return F.cross_entropy(F.linear(h_CH, w_VH).float(), t_C, ignore_index=ignore_index, reduction="none")


VOCAB_BLOCK = 4096  # logits per step of the Triton kernels' loop over the vocabulary


@functools.cache
def _kernels() -> SimpleNamespace:
    import triton
    import triton.language as tl

    @triton.jit
    def loss_fwd(L, T, LOSS, LSE, V, ignore_index, BLOCK: tl.constexpr):
        """One row of logits: logsumexp by an online max/sum over blocks, loss = lse - logit[target]."""
        row = tl.program_id(0).to(tl.int64)
        base = L + row * V
        cols = tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        mx = tl.max(x, axis=0)
        acc = tl.sum(tl.exp(x - mx), axis=0)
        for start in range(BLOCK, V, BLOCK):
            c = start + cols
            x = tl.load(base + c, mask=c < V, other=float("-inf")).to(tl.float32)
            new_mx = tl.maximum(mx, tl.max(x, axis=0))
            acc = acc * tl.exp(mx - new_mx) + tl.sum(tl.exp(x - new_mx), axis=0)
            mx = new_mx
        lse = mx + tl.log(acc)
        t = tl.load(T + row)
        keep = t != ignore_index
        xt = tl.load(base + tl.where(keep, t, 0)).to(tl.float32)
        tl.store(LOSS + row, tl.where(keep, lse - xt, 0.0))
        tl.store(LSE + row, lse)

    @triton.jit
    def grad_in_place(L, T, LSE, G, V, ignore_index, BLOCK: tl.constexpr):
        """Overwrite one row of logits with d loss / d logits = (softmax - one-hot(target)) * g."""
        row = tl.program_id(0).to(tl.int64)
        base = L + row * V
        t = tl.load(T + row)
        g = tl.where(t != ignore_index, tl.load(G + row), 0.0)
        lse = tl.load(LSE + row)
        cols = tl.arange(0, BLOCK)
        for start in range(0, V, BLOCK):
            c = start + cols
            m = c < V
            x = tl.load(base + c, mask=m, other=0.0).to(tl.float32)
            d = (tl.exp(x - lse) - tl.where(c == t, 1.0, 0.0)) * g
            tl.store(base + c, d.to(L.dtype.element_ty), mask=m)

    return SimpleNamespace(loss_fwd=loss_fwd, grad_in_place=grad_in_place)


def _fused_chunk_forward(h_CH, w_VH, t_C, ignore_index) -> tuple[torch.Tensor, torch.Tensor]:
    logits = F.linear(h_CH, w_VH).contiguous()
    C, V = logits.shape
    loss = torch.empty(C, dtype=torch.float32, device=logits.device)
    lse = torch.empty(C, dtype=torch.float32, device=logits.device)
    block = min(VOCAB_BLOCK, row_block(V))
    _kernels().loss_fwd[(C,)](logits, t_C, loss, lse, V, ignore_index, BLOCK=block, num_warps=warps_for(block))
    return loss, lse


def _fused_chunk_grad_logits(h_CH, w_VH, t_C, lse_C, g_C, ignore_index) -> torch.Tensor:
    logits = F.linear(h_CH, w_VH).contiguous()
    C, V = logits.shape
    block = min(VOCAB_BLOCK, row_block(V))
    _kernels().grad_in_place[(C,)](logits, t_C, lse_C, g_C, V, ignore_index, BLOCK=block,
                                   num_warps=warps_for(block))
    return logits


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Inputs arrive already in the compute dtype; autocast is off inside (the caller did its casts)."""

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, targets_N, chunk_tokens: int, ignore_index: int, fused: bool):
        loss_N = torch.empty(targets_N.shape, dtype=torch.float32, device=hidden_NH.device)
        lse_N = torch.empty(targets_N.shape, dtype=torch.float32, device=hidden_NH.device) if fused else None
        with torch.no_grad():
            for s in range(0, hidden_NH.shape[0], chunk_tokens):
                e = s + chunk_tokens
                if fused:
                    loss_N[s:e], lse_N[s:e] = _fused_chunk_forward(hidden_NH[s:e], weight_VH, targets_N[s:e],
                                                                   ignore_index)
                else:
                    loss_N[s:e] = _chunk_loss(hidden_NH[s:e], weight_VH, targets_N[s:e], ignore_index)
        ctx.save_for_backward(hidden_NH, weight_VH, targets_N, lse_N)
        ctx.chunk_tokens, ctx.ignore_index, ctx.fused = chunk_tokens, ignore_index, fused
        return loss_N

    @staticmethod
    def backward(ctx, grad_N):
        hidden_NH, weight_VH, targets_N, lse_N = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(hidden_NH) if need_h else None
        grad_w = torch.zeros(weight_VH.shape, dtype=torch.float32, device=weight_VH.device) if need_w else None
        if ctx.fused:
            g_N = grad_N.float().contiguous()
            for s in range(0, hidden_NH.shape[0], ctx.chunk_tokens):
                e = s + ctx.chunk_tokens
                d_CV = _fused_chunk_grad_logits(hidden_NH[s:e], weight_VH, targets_N[s:e], lse_N[s:e], g_N[s:e],
                                                ctx.ignore_index)
                if need_h:
                    grad_h[s:e] = d_CV @ weight_VH
                if need_w:
                    grad_w += (d_CV.t() @ hidden_NH[s:e]).float()
            return grad_h, grad_w.to(weight_VH.dtype) if need_w else None, None, None, None, None
        w = weight_VH.detach().requires_grad_(need_w)
        for s in range(0, hidden_NH.shape[0], ctx.chunk_tokens):
            e = s + ctx.chunk_tokens
            h = hidden_NH[s:e].detach().requires_grad_(need_h)
            with torch.enable_grad(), torch.autocast(hidden_NH.device.type, enabled=False):
                loss = _chunk_loss(h, w, targets_N[s:e], ctx.ignore_index)
            inputs = [x for x, need in ((h, need_h), (w, need_w)) if need]
            grads = list(torch.autograd.grad(loss, inputs, grad_N[s:e]))
            if need_h:
                grad_h[s:e] = grads.pop(0)
            if need_w:
                grad_w += grads.pop(0)  # summed in fp32 over chunks, rounded to the weight's dtype once
        return grad_h, grad_w.to(weight_VH.dtype) if need_w else None, None, None, None, None


def linear_cross_entropy(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, targets_N: torch.Tensor,
                         chunk_tokens: int | None = None, ignore_index: int = IGNORE_INDEX,
                         fused: bool = False) -> torch.Tensor:
    """Per-token fp32 cross-entropy of `hidden @ weight.T` against `targets` (0 where ignored), computed
    `chunk_tokens` (default `CHUNK_TOKENS`) tokens at a time in forward and again in backward; never holds
    all the logits. `fused` (chosen once where the model is built): the loss and its gradient from the Triton
    kernels."""
    from torch.distributed.tensor import DTensor

    if chunk_tokens is None:
        chunk_tokens = CHUNK_TOKENS
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if isinstance(weight_VH, DTensor):
        raise TypeError("the LM head weight is a sharded DTensor: call this where its FSDP unit has gathered it "
                        "(moecpt shards the head with the root unit, gathered for the whole forward)")
    device_type = hidden_NH.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden_NH, weight_VH = hidden_NH.to(dtype), weight_VH.to(dtype)
    elif hidden_NH.dtype != weight_VH.dtype:
        raise TypeError(f"hidden is {hidden_NH.dtype} but the weight is {weight_VH.dtype} (outside autocast)")
    with torch.autocast(device_type, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(hidden_NH, weight_VH, targets_N.contiguous(), chunk_tokens,
                                                ignore_index, fused)
