"""The chunked LM-head cross-entropy: same losses and gradients as the plain path, without the full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from moecpt.kernels.cross_entropy import IGNORE_INDEX, linear_cross_entropy, linear_cross_entropy_reference

N, H, V = 37, 16, 101  # N not a multiple of the chunk size: the last chunk is short


def _inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g, dtype=dtype) * 0.5).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    t[::5] = IGNORE_INDEX
    gout = torch.rand(N, generator=g)  # per-token weights, as a per-corpus or scaled sum gives
    return h, w, t, gout


def _loss_and_grads(fn, h, w, t, gout, **kw):
    h.grad = w.grad = None
    loss = fn(h, w, t, **kw)
    (loss * gout).sum().backward()
    return loss.detach(), h.grad.clone(), w.grad.clone()


@pytest.mark.parametrize("chunk", [1, 8, N, 1000])
def test_fp32_matches_f_cross_entropy(chunk):
    h, w, t, gout = _inputs()
    want = _loss_and_grads(
        lambda h, w, t: F.cross_entropy(h @ w.T, t, ignore_index=IGNORE_INDEX, reduction="none"), h, w, t, gout)
    got = _loss_and_grads(linear_cross_entropy, h, w, t, gout, chunk_tokens=chunk)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (got[0][t == IGNORE_INDEX] == 0).all()
    assert got[0].dtype == torch.float32


def test_autocast_bf16_matches_the_plain_path_under_autocast():
    h, w, t, gout = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _loss_and_grads(linear_cross_entropy_reference, h, w, t, gout)
        got = _loss_and_grads(linear_cross_entropy, h, w, t, gout, chunk_tokens=8)
    assert got[1].dtype == h.dtype and got[2].dtype == w.dtype  # gradients reach the fp32 master weights
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)  # same bf16 matmul per row, same fp32 loss
    torch.testing.assert_close(got[1], want[1], rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(got[2], want[2], rtol=2e-2, atol=2e-3)


def test_bf16_weights_match_fp32_within_bf16_tolerance():
    h, w, t, gout = _inputs()
    want = _loss_and_grads(linear_cross_entropy_reference, h, w, t, gout)
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    got = _loss_and_grads(linear_cross_entropy, hb, wb, t, gout, chunk_tokens=8)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], want[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[1].float(), want[1], rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(got[2].float(), want[2], rtol=5e-2, atol=5e-3)


def test_only_the_needed_gradients_and_no_grad_forward():
    h, w, t, _ = _inputs()
    frozen = w.detach()
    linear_cross_entropy(h, frozen, t, chunk_tokens=8).sum().backward()
    assert h.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t, chunk_tokens=8),
                                   linear_cross_entropy_reference(h, w, t), rtol=1e-5, atol=1e-6)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, tuple | list) else (out,):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
        return out


def test_never_materialises_all_the_logits():
    h, w, t, gout = _inputs()
    with _LargestTensor() as mode:
        (linear_cross_entropy(h, w, t, chunk_tokens=8) * gout).sum().backward()
    assert mode.largest <= max(8 * V, V * H)  # a chunk's logits, or the weight's gradient
    assert N * V > max(8 * V, V * H)
    with _LargestTensor() as plain:
        (linear_cross_entropy_reference(h, w, t) * gout).sum().backward()
    assert plain.largest >= N * V  # the check would see the full logits


def test_model_loss_only_matches_the_logits_path():
    from moecpt.model import MixtralForCausalLM
    from moecpt.model.config import MixtralConfig

    torch.manual_seed(0)
    cfg = MixtralConfig.from_preset("tiny", vocab_size=97, hidden_size=32, intermediate_size=48)
    model = MixtralForCausalLM(cfg)
    ids = torch.randint(0, 97, (2, 12))
    targets = torch.randint(0, 97, (2, 12))
    targets[0, :3] = IGNORE_INDEX
    # The loss path (targets: no logits) against cross-entropy over the full logits of the plain call.
    results = []
    for lean_path in (False, True):
        model.zero_grad()
        if lean_path:
            out = model(ids, targets=targets)
            token_loss, aux = out.token_loss, out.aux_loss
        else:
            out = model(ids)
            token_loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(),
                                                           reduction="none").view(targets.shape)
            aux = out.aux_loss
        (token_loss.sum() / (targets != IGNORE_INDEX).sum() + aux).backward()
        results.append((token_loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (full, g_full), (lean, g_lean) = results
    torch.testing.assert_close(lean, full, rtol=1e-6, atol=1e-6)
    for name in g_full:
        torch.testing.assert_close(g_lean[name], g_full[name], rtol=1e-5, atol=1e-7, msg=name)
