"""Model configuration: the moecpt training settings every family shares, and the Mixtral config (the
Hugging Face Mixtral fields, plus named presets).

Field names follow the family's transformers config so that a `config.json` maps onto the dataclass one to
one. Every family config also answers `n_experts`, `top_k` and `expert_ffn`, the names generic code uses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from moecpt.errors import UserError
from moecpt.model.rope import Yarn

BALANCE_SCOPES = ("micro_batch", "sequence", "global")


@dataclass(frozen=True)
class FamilyConfig:
    """What every family's config shares: how its routers are trained, and reading and writing Hugging Face
    `config.json` dicts. A family's config subclasses it with the fields of its transformers config.

    The router-training settings are moecpt's, not Hugging Face config fields (never exported):

    - `router_z_loss_coef`: ST-MoE router z-loss coefficient;
    - `router_balance_scope`: the tokens the load-balancing loss pools: "micro_batch" (transformers, Megatron),
      "sequence", or "global" (expert fractions summed over data-parallel ranks, as Qwen3 was trained);
    - `router_bias_update_rate`: > 0 turns on aux-loss-free balancing (a per-expert selection bias moved by
      this much per step toward the under-loaded experts, DeepSeek-V3's rule).
    """

    model_type: ClassVar[str]
    architecture: ClassVar[str]  # the transformers class name written into config.json
    hf_extras: ClassVar[dict[str, Any]] = {}  # config.json keys moecpt always writes (features it does not use)
    presets: ClassVar[dict[str, FamilyConfig]] = {}
    required: ClassVar[tuple[str, ...]] = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")

    router_z_loss_coef: float = 0.0
    router_balance_scope: str = "micro_batch"
    router_bias_update_rate: float = 0.0

    @classmethod
    def from_preset(cls, name: str, **overrides: Any):
        """A named shape of this family, optionally with fields overridden."""
        if name not in cls.presets:
            raise UserError(f"unknown model preset {name!r} of {cls.model_type}; choose one of "
                            f"{', '.join(sorted(cls.presets))}")
        return dataclasses.replace(cls.presets[name], **overrides)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json"):
        """Read a Hugging Face `config.json` dict of this family (transformers 4.x or 5.x spelling)."""
        return cls(**cls.hf_kwargs(d, source))

    @classmethod
    def hf_kwargs(cls, d: dict[str, Any], source: str) -> dict[str, Any]:
        """The dataclass fields of a `config.json` dict: model_type checked, the default RoPE's theta read from
        rope_parameters / rope_scaling, the first of several token ids, transformers 5's `num_local_experts`
        spelling, a missing `num_key_value_heads` (= the heads), required keys present."""
        model_type = d.get("model_type")
        if model_type not in (None, cls.model_type):
            raise UserError(f"{source}: model_type is {model_type!r}, not {cls.model_type!r}")
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)} - set(MOECPT_FIELDS)
        if d.get("attention_dropout"):
            raise UserError(f"{source}: attention_dropout={d['attention_dropout']} is not supported; set it to 0")
        if "num_experts" in names and "num_experts" not in d and "num_local_experts" in d:
            d["num_experts"] = d["num_local_experts"]
        heads = d.get("num_attention_heads")
        if d.get("num_key_value_heads") is None and heads:
            d["num_key_value_heads"] = heads
        if "head_dim" not in names and d.get("head_dim") is not None and heads \
                and d["head_dim"] != d.get("hidden_size", 0) // heads:
            raise UserError(f"{source}: head_dim {d['head_dim']} differs from hidden_size / num_attention_heads; "
                            f"transformers' {cls.model_type} has no separate head size")
        d |= cls.rope_kwargs(d, names, source)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(d.get(key), list):  # some configs list several ids; the first is the canonical one
                d[key] = d[key][0] if d[key] else None
        missing = [k for k in cls.required if k not in d]
        if missing:
            raise UserError(f"{source}: missing required key(s) {', '.join(missing)}")
        return {k: v for k, v in d.items() if k in names}

    @staticmethod
    def rope_kwargs(d: dict[str, Any], names: set[str], source: str) -> dict[str, Any]:
        """`rope_theta` (and `rope_scaling`, a `Yarn`, for a family config with that field) from a config.json's
        `rope_parameters` (transformers 5) or `rope_scaling` (4.x) dict; rope types other than the default and
        (where the family has it) YaRN are refused."""
        rope = d.pop("rope_parameters", None) or d.pop("rope_scaling", None)
        if not rope:
            return {"rope_scaling": None} if "rope_scaling" in names else {}
        if not isinstance(rope, dict):
            raise UserError(f"{source}: rope_parameters must be a JSON object, got {rope!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        supported = ("default", "yarn") if "rope_scaling" in names else ("default",)
        if rope_type not in supported:
            raise UserError(f"{source}: rope type {rope_type!r} is not supported (supported: {', '.join(supported)})")
        out = {"rope_theta": rope.get("rope_theta", d.get("rope_theta", 1e6))}
        if "rope_scaling" in names:
            out["rope_scaling"] = Yarn.from_hf(rope, source) if rope_type == "yarn" else None
        return out

    def to_hf_dict(self, dtype: str = "float32") -> dict[str, Any]:
        """A `config.json` dict that transformers (4.x and 5.x) reads as this family's model: the RoPE in
        `rope_parameters` (5.x) and, when scaled, in `rope_scaling` (4.x) too."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in MOECPT_FIELDS}
        yarn = d.pop("rope_scaling", None)
        rope = {"rope_type": "default"} if yarn is None else yarn.to_hf()
        if yarn is not None:
            d["rope_scaling"] = rope
        return d | {"architectures": [self.architecture], "model_type": self.model_type, "torch_dtype": dtype,
                    "use_cache": True, "output_router_logits": False,
                    "rope_parameters": rope | {"rope_theta": self.rope_theta}} | self.hf_extras

    # ---- what generic code reads, and the checks every family makes -------------------------------------
    @property
    def top_k(self) -> int:
        return self.num_experts_per_tok

    @property
    def attn_head_dim(self) -> int:
        return getattr(self, "head_dim", None) or self.hidden_size // self.num_attention_heads

    def router_options(self) -> dict[str, Any]:
        """The `Router` settings of this config: renormalised top-k or not, and a selection bias when
        aux-loss-free balancing is on."""
        return {"norm_topk": getattr(self, "norm_topk_prob", True), "bias": self.router_bias_update_rate > 0}

    def shape_problems(self, positive: tuple[str, ...]) -> list[str]:
        """The checks every family makes: `positive` fields, heads divisible by kv heads, a whole even head
        size, no more experts per token than experts, SiLU experts."""
        problems = [f"{n} must be positive, got {getattr(self, n)}" for n in positive if int(getattr(self, n)) <= 0]
        heads, kv = max(self.num_attention_heads, 1), max(self.num_key_value_heads, 1)
        if heads % kv:
            problems.append(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                            f"num_key_value_heads ({self.num_key_value_heads})")
        head_dim = getattr(self, "head_dim", None)
        if head_dim is None and (self.hidden_size % heads or (self.hidden_size // heads) % 2):
            problems.append(f"hidden_size ({self.hidden_size}) / num_attention_heads ({self.num_attention_heads}) "
                            "must be a whole, even head size; set head_dim explicitly where the family has one")
        elif head_dim is not None and (head_dim <= 0 or head_dim % 2):
            problems.append(f"head_dim must be a positive even number, got {head_dim}")
        if self.top_k > self.n_experts:
            problems.append(f"num_experts_per_tok ({self.top_k}) exceeds the number of experts ({self.n_experts})")
        if getattr(self, "hidden_act", "silu") != "silu":
            problems.append(f"hidden_act {self.hidden_act!r} is not supported (the experts are SiLU-gated)")
        return problems + self.router_problems()

    def raise_problems(self, problems: list[str]) -> None:
        if problems:
            raise UserError(f"invalid {self.model_type} model config: " + "; ".join(problems))

    def router_problems(self) -> list[str]:
        problems = []
        if self.router_balance_scope not in BALANCE_SCOPES:
            problems.append(f"router_balance_scope {self.router_balance_scope!r}: choose one of "
                            f"{', '.join(BALANCE_SCOPES)}")
        if self.router_bias_update_rate < 0 or self.router_z_loss_coef < 0:
            problems.append("router_bias_update_rate and router_z_loss_coef must be >= 0")
        return problems


class DenseLayers:
    """For families whose `mlp_only_layers` and `decoder_sparse_step` make some layers dense (transformers'
    rule: layer i is a MoE layer unless listed, when (i + 1) is a multiple of the step)."""

    @property
    def sparse_layers(self) -> list[int]:
        """The indices of the MoE layers; the others are dense MLP layers."""
        return [i for i in range(self.num_hidden_layers)
                if i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0]

    def dense_layer_problems(self) -> list[str]:
        problems = []
        outside = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if outside:
            problems.append(f"mlp_only_layers {outside} are not layer indices 0..{self.num_hidden_layers - 1}")
        if self.num_hidden_layers > 0 and self.decoder_sparse_step > 0 and not self.sparse_layers:
            problems.append("mlp_only_layers and decoder_sparse_step leave no MoE layer; moecpt trains "
                            "mixture-of-experts models")
        return problems


ATTENTION_TYPES = ("full_attention", "sliding_attention")


class LayerTypes:
    """For families whose `layer_types` (or its default, `attention_types`) name each layer's attention,
    "full_attention" or "sliding_attention" (within `sliding_window` positions)."""

    def layer_type_problems(self) -> list[str]:
        """A `layer_types` of another length than the layers, or with an attention type moecpt lacks."""
        if self.layer_types is None:
            return []
        problems = []
        if len(self.layer_types) != self.num_hidden_layers:
            problems.append(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} "
                            "layers (num_hidden_layers)")
        unknown = sorted(set(self.layer_types) - set(ATTENTION_TYPES))
        if unknown:
            problems.append(f"layer_types {unknown} are not supported; use {' or '.join(ATTENTION_TYPES)}")
        return problems

    def window(self, layer: int) -> int | None:
        """The attention window of a layer (None: full causal attention)."""
        return self.sliding_window if self.attention_types[layer] == "sliding_attention" else None


MOECPT_FIELDS = ("router_z_loss_coef", "router_balance_scope", "router_bias_update_rate")


@dataclass(frozen=True)
class MixtralConfig(FamilyConfig):
    model_type: ClassVar[str] = "mixtral"
    architecture: ClassVar[str] = "MixtralForCausalLM"
    hf_extras: ClassVar[dict[str, Any]] = {"attention_dropout": 0.0, "router_jitter_noise": 0.0}
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336  # per expert
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = None
    router_aux_loss_coef: float = 0.02  # Mixtral's published value
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        self.raise_problems(self.shape_problems((
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "num_local_experts", "num_experts_per_tok")))

    @property
    def n_experts(self) -> int:
        return self.num_local_experts

    @property
    def expert_ffn(self) -> int:
        return self.intermediate_size

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> MixtralConfig:
        if d.get("router_jitter_noise"):
            raise UserError(f"{source}: router_jitter_noise={d['router_jitter_noise']} is not supported; set it to 0")
        return cls(**cls.hf_kwargs(d, source))


PRESETS: dict[str, MixtralConfig] = {
    "mixtral-8x7b": MixtralConfig(),
    # The benchmark shape of the GPU throughput issue.
    "bench-1b": MixtralConfig(
        hidden_size=1024, intermediate_size=3584, num_hidden_layers=12, num_attention_heads=16,
        num_key_value_heads=4, max_position_embeddings=4096,
    ),
    # Small enough to train for minutes on a laptop CPU, with the real 32,000-piece vocabulary.
    "mini": MixtralConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=2048,
    ),
    # For tests: a few hundred thousand parameters besides the embeddings.
    "tiny": MixtralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, max_position_embeddings=2048,
    ),
}
MixtralConfig.presets = PRESETS
