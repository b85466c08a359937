"""Building and loading a model of any family: from a config (on the meta device, or initialised), or from a
Hugging Face directory, strictly (every tensor used, every shape checked, else nothing is loaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moecpt.errors import UserError
from moecpt.model import hf
from moecpt.model.base import CausalLM
from moecpt.model.families import family, family_of


def config_from_hf(d: dict[str, Any], source: str = "config.json"):
    """A Hugging Face `config.json` dict as the config of its family (chosen by `model_type`)."""
    return family(d.get("model_type"), source).config_cls.from_hf_dict(d, source=source)


def load_config(hf_dir: str | Path):
    """The model config of a Hugging Face directory."""
    return config_from_hf(hf.read_config_json(hf_dir), source=str(Path(hf_dir) / "config.json"))


def param_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, without building the model."""
    return family_of(config).adapter_cls(config).param_shapes()


def build_model(config, device: str | torch.device = "meta", seed: int | None = None) -> CausalLM:
    """The family's model, built on the meta device (no memory) and, for another `device`, materialised there
    and initialised once by the family's rule from a generator seeded with `seed` (None: torch's global RNG)."""
    with torch.device("meta"):
        model = family_of(config).model_cls(config)
    if torch.device(device).type != "meta":
        model.to_empty(device=device)
        model.tie_weights()
        model.init_weights(None if seed is None else torch.Generator().manual_seed(seed))
    return model


def from_pretrained(hf_dir: str | Path, dtype: torch.dtype | None = torch.float32,
                    device: str | torch.device = "cpu") -> CausalLM:
    """Load a Hugging Face directory (config.json + safetensors, single or sharded) strictly, in the hub or
    the transformers-5 fused layout. `dtype=None` keeps the checkpoint's dtype."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise UserError(f"{hf_dir}: not a directory; expected a Hugging Face model directory")
    config = load_config(hf_dir)
    adapter = family_of(config).adapter_cls(config)
    tensors = hf.SafetensorsDir(hf_dir)
    layout = adapter.detect_layout(tensors.names())
    hf.check_tensors(tensors, adapter.hf_shapes(layout), str(hf_dir), optional=adapter.optional_hf_shapes())
    model = build_model(config)
    state = {name: t.to(device=device, dtype=dtype or t.dtype) for name, t in adapter.from_hf(tensors.get, layout)}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model
