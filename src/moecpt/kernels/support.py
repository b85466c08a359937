"""Where moecpt's Triton kernels can run: a CUDA device with Triton installed, or a CPU under Triton's
interpreter (`TRITON_INTERPRET=1`, how the kernel tests run without a GPU). Everywhere else every fused op
falls back to its plain PyTorch reference."""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    return _INSTALLED


def interpreting() -> bool:
    """Whether Triton runs kernels in its Python interpreter. TRITON_INTERPRET only counts if it was set
    before Triton was imported: Triton builds its own jitted helpers (tl.sum, ...) at import, for the
    interpreter or for the GPU compiler, and a kernel cannot mix the two."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False
    lang = sys.modules.get("triton.language")
    if lang is None:
        return True  # Triton will start in interpreter mode
    return type(getattr(lang, "sum", None)).__name__ == "InterpretedFunction"


def triton_usable(device: torch.device | str) -> bool:
    """Whether a Triton kernel can take tensors on `device`."""
    kind = torch.device(device).type
    if not triton_installed():
        return False
    return kind == "cuda" or (kind == "cpu" and interpreting())


def why_not_triton(device: torch.device | str) -> str:
    """A sentence saying why Triton cannot be used on `device` ('' if it can)."""
    if not triton_installed():
        return "Triton is not installed (pip install triton; it comes with torch's CUDA builds)"
    kind = torch.device(device).type
    if kind == "cpu" and not interpreting():
        return ("the device is a CPU (Triton kernels need a GPU, or TRITON_INTERPRET=1 set before Triton is "
                "imported to test them on a CPU)")
    if kind not in ("cpu", "cuda"):
        return f"Triton kernels are not written for {kind} devices"
    return ""


def row_block(n: int) -> int:
    """The power-of-two block that holds a row of `n` elements (Triton blocks are powers of two)."""
    return 1 << max(0, (n - 1).bit_length())


def warps_for(block: int) -> int:
    """Warps per program for a kernel that walks `block` elements of a row at a time (a starting point,
    to be tuned on the GPU: 4 up to 1,024 elements, 8 up to 4,096, then 16)."""
    return 4 if block <= 1024 else 8 if block <= 4096 else 16
