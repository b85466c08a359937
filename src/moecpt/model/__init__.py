"""The Mixtral MoE model (single device), its configuration and Hugging Face interop."""

from moecpt.model.config import PRESETS, MixtralConfig
from moecpt.model.hf import from_pretrained
from moecpt.model.mixtral import CausalLMOutput, KVCache, MixtralForCausalLM

__all__ = ["PRESETS", "CausalLMOutput", "KVCache", "MixtralConfig", "MixtralForCausalLM", "from_pretrained"]
