"""Shared test fixtures: where the real data lives (tests/corpora.py), and deterministic torch settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Triton decides at import whether its kernels (and its own library of jitted helpers such as tl.sum) run in
# its interpreter, so the switch is set before anything imports Triton. Nothing runs a Triton kernel unless a
# test asks for the fused kernels (kernels.triton = "auto" means GPU only). MOECPT_TEST_TRITON_NATIVE=1 leaves
# it unset (compiled kernels, for a run on a GPU).
if not os.environ.get("MOECPT_TEST_TRITON_NATIVE"):
    os.environ["TRITON_INTERPRET"] = "1"

from .corpora import HAVE_SHARED, SHARED_DATA, tiny_text


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, for tests that need its specific files; tests that need real text but no particular
    file use tests/corpora.py (or `tiny_corpora`), which stands in moecpt's built-in corpora without it."""
    if not HAVE_SHARED:
        pytest.skip(f"the shared corpora are not at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_corpora() -> dict[str, list[str]]:
    """The tiny training config's two small corpora (ja, en): shared files, or their built-in stand-ins."""
    return tiny_text()


@pytest.fixture(autouse=True)
def _torch_threads():
    """Keep each test on the 2 CPU cores without oversubscription."""
    try:
        import torch
    except ImportError:
        yield
        return
    torch.set_num_threads(2)
    yield
