"""The models moecpt trains (single device): shared blocks, the one loss, the families and Hugging Face interop."""

from moecpt.model.auto import build_model, config_from_hf, from_pretrained, load_config, param_shapes
from moecpt.model.base import CausalLM, CausalLMOutput
from moecpt.model.config import PRESETS, MixtralConfig
from moecpt.model.families.mixtral import MixtralForCausalLM
from moecpt.model.layers import KVCache
from moecpt.model.loss import LossOutput

__all__ = ["PRESETS", "CausalLM", "CausalLMOutput", "KVCache", "LossOutput", "MixtralConfig", "MixtralForCausalLM",
           "build_model", "config_from_hf", "from_pretrained", "load_config", "param_shapes"]
