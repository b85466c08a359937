"""Which fused kernel runs `F.scaled_dot_product_attention` on a GPU: a preference, never a different result.

`sdpa_backend("cudnn")` puts cuDNN attention first, then flash, memory-efficient and math (PyTorch falls back
along that list where a backend cannot take the inputs, e.g. an explicit mask); "auto" leaves PyTorch's own
choice. On a CPU every choice is PyTorch's own: the math is the same kernel-free SDPA either way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
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
