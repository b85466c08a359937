"""The model families moecpt trains, by their Hugging Face `model_type`.

A family is a config dataclass (fields of its Hugging Face `config.json`, with `from_hf_dict`/`to_hf_dict` and
presets), a `CausalLM` subclass (the block wiring and the init rule) and a state-dict adapter (parameter names
and shapes, and their Hugging Face names in each layout). A new family is one module here plus an entry below.
"""

from __future__ import annotations

from dataclasses import dataclass

from moecpt.errors import UserError
from moecpt.model.base import CausalLM
from moecpt.model.config import MixtralConfig
from moecpt.model.families.deepseek_v2 import DeepseekV2Config, DeepseekV2ForCausalLM
from moecpt.model.families.deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM
from moecpt.model.families.gpt_oss import GptOssConfig, GptOssForCausalLM
from moecpt.model.families.mixtral import MixtralForCausalLM
from moecpt.model.families.olmoe import OlmoeConfig, OlmoeForCausalLM
from moecpt.model.families.qwen2_moe import Qwen2MoeConfig, Qwen2MoeForCausalLM
from moecpt.model.families.qwen3_moe import Qwen3MoeConfig, Qwen3MoeForCausalLM


@dataclass(frozen=True)
class Family:
    config_cls: type
    model_cls: type[CausalLM]

    @property
    def model_type(self) -> str:
        return self.config_cls.model_type

    @property
    def adapter_cls(self) -> type:
        return self.model_cls.adapter_cls


FAMILIES: dict[str, Family] = {
    "deepseek_v2": Family(DeepseekV2Config, DeepseekV2ForCausalLM),
    "deepseek_v3": Family(DeepseekV3Config, DeepseekV3ForCausalLM),
    "gpt_oss": Family(GptOssConfig, GptOssForCausalLM),
    "mixtral": Family(MixtralConfig, MixtralForCausalLM),
    "olmoe": Family(OlmoeConfig, OlmoeForCausalLM),
    "qwen2_moe": Family(Qwen2MoeConfig, Qwen2MoeForCausalLM),
    "qwen3_moe": Family(Qwen3MoeConfig, Qwen3MoeForCausalLM),
}


def family(model_type: str | None, source: str = "config") -> Family:
    """The family of a Hugging Face `model_type` (None: Mixtral, for configs that predate the field)."""
    found = FAMILIES.get(model_type or "mixtral")
    if found is None:
        raise UserError(f"{source}: model_type is {model_type!r}; moecpt trains {', '.join(sorted(FAMILIES))}")
    return found


def preset_config(name: str, **overrides):
    """The config of a named preset of any family (`model.preset`), with fields overridden."""
    for f in FAMILIES.values():
        if name in f.config_cls.presets:
            return f.config_cls.from_preset(name, **overrides)
    names = sorted(n for f in FAMILIES.values() for n in f.config_cls.presets)
    raise UserError(f"unknown model preset {name!r}; choose one of {', '.join(names)}")


def family_of(config) -> Family:
    """The family a config dataclass belongs to."""
    for f in FAMILIES.values():
        if isinstance(config, f.config_cls):
            return f
    raise UserError(f"{type(config).__name__} is not the config of a moecpt model family")
