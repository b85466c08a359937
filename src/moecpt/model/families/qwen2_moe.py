"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): multi-head or GQA attention with biases on the q, k and v
projections (none on o), softmax top-k routing over `num_experts` experts of `moe_intermediate_size` (not
renormalised unless `norm_topk_prob`), plus a shared expert of `shared_expert_intermediate_size` that every
token goes through, gated by sigmoid(shared_expert_gate(x)) and added to the routed output. Dense SwiGLU
layers of `intermediate_size` where `mlp_only_layers` or `decoder_sparse_step` say so.

Read from transformers' `models/qwen2_moe` (5.x):
- a layer is sparse unless its index is in `mlp_only_layers`, and only when (index + 1) is a multiple of
  `decoder_sparse_step`; the load-balancing loss pools the MoE layers only;
- `layer_types` names each layer's attention ("full_attention" or "sliding_attention", the latter within
  `sliding_window` positions). Without it, transformers 5 derives it: with `use_sliding_window`, the
  even-indexed layers below `max_window_layers` slide. That rule is used here too, and `config.json` is always
  written with `layer_types` spelled out, so both sides read the same layers;
- the head size is hidden_size / num_attention_heads (transformers' Qwen2-MoE has no head_dim field).

Hugging Face layouts read: the hub layout of the published checkpoints (`mlp.experts.{j}.gate_proj/up_proj/
down_proj`, router `mlp.gate`, `mlp.shared_expert.*`, `mlp.shared_expert_gate`) and the fused layout of
transformers 5 (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`). Saving writes the hub layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from moecpt.model.adapter import StateDictAdapter
from moecpt.model.base import CausalLM
from moecpt.model.config import DenseLayers, FamilyConfig, LayerTypes
from moecpt.model.layers import Attention, DecoderLayer
from moecpt.model.moe import DenseMLP, SparseMoeBlock


@dataclass(frozen=True)
class Qwen2MoeConfig(DenseLayers, LayerTypes, FamilyConfig):
    """The fields of transformers' Qwen2MoeConfig, with its defaults."""

    model_type: ClassVar[str] = "qwen2_moe"
    architecture: ClassVar[str] = "Qwen2MoeForCausalLM"
    hf_extras: ClassVar[dict[str, Any]] = {"attention_dropout": 0.0}

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 5632  # the dense layers (mlp_only_layers, decoder_sparse_step)
    moe_intermediate_size: int = 1408  # per routed expert
    shared_expert_intermediate_size: int = 5632
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    num_experts: int = 60
    num_experts_per_tok: int = 4
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    qkv_bias: bool = True
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    use_sliding_window: bool = False
    sliding_window: int | None = 4096  # used only with use_sliding_window, on the "sliding_attention" layers
    max_window_layers: int = 28
    layer_types: tuple[str, ...] | None = None  # None: transformers 5's rule (see attention_types)
    router_aux_loss_coef: float = 0.001
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        # config.json lists become tuples (the config is frozen and hashable).
        object.__setattr__(self, "mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers or ()))
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.raise_problems(self.shape_problems((
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
            "shared_expert_intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "num_experts", "num_experts_per_tok", "decoder_sparse_step")) + self.dense_layer_problems()
            + self._window_problems())

    def _window_problems(self) -> list[str]:
        problems = self.layer_type_problems()
        if "sliding_attention" in (self.layer_types or ()) and not self.use_sliding_window:
            problems.append("layer_types has sliding_attention layers but use_sliding_window is false "
                            "(transformers then sets sliding_window to 0); turn it on or use full_attention")
        if self.use_sliding_window and (self.sliding_window is None or self.sliding_window <= 0):
            problems.append(f"use_sliding_window needs a positive sliding_window, got {self.sliding_window}")
        return problems

    @property
    def attention_types(self) -> tuple[str, ...]:
        """Each layer's attention: `layer_types`, or transformers 5's default (with use_sliding_window, the
        even-indexed layers below max_window_layers slide)."""
        if self.layer_types is not None:
            return self.layer_types
        return tuple("sliding_attention" if self.use_sliding_window and i % 2 == 0 and i < self.max_window_layers
                     else "full_attention" for i in range(self.num_hidden_layers))

    @property
    def n_experts(self) -> int:
        return self.num_experts

    @property
    def expert_ffn(self) -> int:
        return self.moe_intermediate_size

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> Qwen2MoeConfig:
        d = dict(d)
        if not d.get("use_sliding_window") and not d.get("sliding_window"):
            d.pop("sliding_window", None)  # transformers writes 0 (5.x) or null when the window is off
        if d.get("mlp_only_layers") is None:
            d.pop("mlp_only_layers", None)
        return cls(**cls.hf_kwargs(d, source))

    def to_hf_dict(self, dtype: str = "float32") -> dict[str, Any]:
        """config.json for transformers 4.x (rope_theta) and 5.x (rope_parameters), with every layer's
        attention type spelled out."""
        d = super().to_hf_dict(dtype)
        d["mlp_only_layers"] = list(self.mlp_only_layers)
        d["layer_types"] = list(self.attention_types)
        return d


def qwen2_moe_layer(c: Qwen2MoeConfig, i: int) -> DecoderLayer:
    attention = Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.attn_head_dim, i,
                          qkv_bias=c.qkv_bias, window=c.window(i))
    if i not in c.sparse_layers:
        dense = DenseMLP(c.hidden_size, c.intermediate_size)
        return DecoderLayer(c.hidden_size, c.rms_norm_eps, attention, dense, sparse=False)
    moe = SparseMoeBlock(c.hidden_size, c.moe_intermediate_size, c.num_experts, c.num_experts_per_tok, c.router_options(),
                         shared_ffn=c.shared_expert_intermediate_size, shared_gate=True)
    return DecoderLayer(c.hidden_size, c.rms_norm_eps, attention, moe, sparse=True)


class Qwen2MoeForCausalLM(CausalLM):
    def __init__(self, config: Qwen2MoeConfig):
        super().__init__()
        self.setup(config, [qwen2_moe_layer(config, i) for i in range(config.num_hidden_layers)])


class Qwen2MoeAdapter(StateDictAdapter):
    model_cls = Qwen2MoeForCausalLM  # the hub layout's names are the adapter's defaults


Qwen2MoeForCausalLM.adapter_cls = Qwen2MoeAdapter


PRESETS: dict[str, Qwen2MoeConfig] = {
    # Qwen/Qwen1.5-MoE-A2.7B's config.json (upcycled from Qwen-1.8B; 14.3B parameters, 2.7B active). Its
    # router_aux_loss_coef 0.001 is the published config value; the balancing scope it was pretrained with is
    # not published (micro-batch, transformers' and Megatron's default, is a guess) and no z-loss is reported.
    "qwen2-moe-a2.7b": Qwen2MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, norm_topk_prob=False,
        decoder_sparse_step=1, max_position_embeddings=8192, rope_theta=1e6, rms_norm_eps=1e-6,
        use_sliding_window=False, sliding_window=32768, max_window_layers=21, tie_word_embeddings=False,
        bos_token_id=151643, eos_token_id=151643, router_aux_loss_coef=0.001,
        router_balance_scope="micro_batch", router_z_loss_coef=0.0,
    ),
    # For tests: every feature of the family at a few hundred thousand parameters besides the embeddings
    # (layer 1 of 3 dense, GQA, a shared expert).
    "qwen2-moe-tiny": Qwen2MoeConfig(
        vocab_size=32000, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        num_experts=8, num_experts_per_tok=2, mlp_only_layers=(1,), max_position_embeddings=2048,
    ),
}
Qwen2MoeConfig.presets = PRESETS
