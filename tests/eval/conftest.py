"""Fixtures of the evaluation tests: the shared evaluation data and a tiny random Mixtral on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="session")
def eval_data() -> Path:
    path = SHARED_DATA / "eval"
    if not path.is_dir():
        pytest.skip(f"the shared evaluation data is not at {path}")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Mixtral (the real 32,000-token vocabulary) saved as a Hugging Face directory."""
    torch = pytest.importorskip("torch")
    from moecpt.model import MixtralForCausalLM
    from moecpt.model.config import MixtralConfig

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig.from_preset("tiny"))
    out = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(out)
    return out
