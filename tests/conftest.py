"""Shared test fixtures: where the real data lives, and deterministic torch settings."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the shared corpora are not at {SHARED_DATA}")
    return SHARED_DATA


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
