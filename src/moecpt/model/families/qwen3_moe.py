"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): GQA attention with an RMSNorm over each head's dims on q and k
before RoPE, no qkv bias (`attention_bias`), fine-grained experts (`num_experts` of `moe_intermediate_size`,
`num_experts_per_tok` per token, no shared expert), softmax top-k routing renormalised when `norm_topk_prob`,
and dense SwiGLU layers of `intermediate_size` where `mlp_only_layers` or `decoder_sparse_step` say so.

Read from transformers' `models/qwen3_moe` (5.x): a layer is sparse unless its index is in `mlp_only_layers`,
and only when (index + 1) is a multiple of `decoder_sparse_step`; with `use_sliding_window` every layer
attends within `sliding_window` positions (transformers 5 has no per-layer choice; 4.x windowed only the
layers from `max_window_layers` on, so a config that asks for a window with `max_window_layers` > 0 is
refused as ambiguous). The load-balancing loss pools the MoE layers only.

Hugging Face layouts read: the hub layout (`mlp.experts.{j}.gate_proj/up_proj/down_proj`, router `mlp.gate`)
and the fused layout of transformers 5 (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`, `mlp.gate`).
Saving writes the hub layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from moecpt.model.adapter import StateDictAdapter
from moecpt.model.base import CausalLM
from moecpt.model.config import DenseLayers, FamilyConfig
from moecpt.model.layers import Attention, DecoderLayer
from moecpt.model.moe import DenseMLP, SparseMoeBlock


@dataclass(frozen=True)
class Qwen3MoeConfig(DenseLayers, FamilyConfig):
    """The fields of transformers' Qwen3MoeConfig, with its defaults (`num_experts` spelled as the hub
    configs spell it; transformers 5 writes it as `num_local_experts`, which is read too)."""

    model_type: ClassVar[str] = "qwen3_moe"
    architecture: ClassVar[str] = "Qwen3MoeForCausalLM"
    hf_extras: ClassVar[dict[str, Any]] = {"attention_dropout": 0.0}

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144  # the dense layers (mlp_only_layers, decoder_sparse_step)
    moe_intermediate_size: int = 768  # per expert
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    num_experts: int = 128
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    use_sliding_window: bool = False
    # Used only with use_sliding_window (transformers: 4096 then, and null written when the window is off).
    sliding_window: int | None = None
    max_window_layers: int | None = None  # transformers 4.x only; kept so that a config.json round-trips
    router_aux_loss_coef: float = 0.001
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    hidden_act: str = "silu"
    # moecpt's setting (never in config.json), defaulting to the regime Qwen3-MoE was pretrained in, so that a
    # model read from a Hugging Face directory (init_from) continues with it: global-batch load balancing
    # (Qwen3 Technical Report, arXiv:2505.09388, section 2; the Qwen3-30B-A3B model card).
    router_balance_scope: str = "global"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mlp_only_layers", tuple(int(i) for i in (self.mlp_only_layers or ())))
        self.raise_problems(self.shape_problems((
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "num_experts", "num_experts_per_tok", "decoder_sparse_step",
            "max_position_embeddings")) + self.dense_layer_problems() + self._window_problems())

    def _window_problems(self) -> list[str]:
        problems = []
        if self.use_sliding_window:
            if self.sliding_window is None or self.sliding_window <= 0:
                problems.append(f"use_sliding_window needs a positive sliding_window, got {self.sliding_window}")
            if self.max_window_layers:
                problems.append(f"use_sliding_window with max_window_layers={self.max_window_layers} is "
                                "ambiguous (transformers 4.x windows only the layers from max_window_layers on, "
                                "transformers 5 every layer); set max_window_layers to 0 for a window on every "
                                "layer")
        return problems

    @property
    def window(self) -> int | None:
        """The attention window of every layer (None: full causal attention)."""
        return self.sliding_window if self.use_sliding_window else None

    @property
    def n_experts(self) -> int:
        return self.num_experts

    @property
    def expert_ffn(self) -> int:
        return self.moe_intermediate_size

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> Qwen3MoeConfig:
        d = dict(d)
        if d.get("use_sliding_window") and "sliding_window" not in d:
            d["sliding_window"] = 4096  # transformers' default window
        return cls(**cls.hf_kwargs(d, source))

    def to_hf_dict(self, dtype: str = "float32") -> dict[str, Any]:
        """config.json for transformers 4.x (rope_theta) and 5.x (rope_parameters), with head_dim always
        written (transformers reads a null head_dim as the head size)."""
        d = super().to_hf_dict(dtype)
        d["head_dim"] = self.attn_head_dim
        d["mlp_only_layers"] = list(self.mlp_only_layers)
        d["sliding_window"] = self.window
        if self.max_window_layers is None:
            del d["max_window_layers"]
        return d


def qwen3_moe_layer(c: Qwen3MoeConfig, i: int) -> DecoderLayer:
    attention = Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.attn_head_dim, i,
                          qkv_bias=c.attention_bias, o_bias=c.attention_bias, qk_norm="head",
                          norm_eps=c.rms_norm_eps, window=c.window)
    if i not in c.sparse_layers:
        return DecoderLayer(c.hidden_size, c.rms_norm_eps, attention, DenseMLP(c.hidden_size, c.intermediate_size),
                            sparse=False)
    moe = SparseMoeBlock(c.hidden_size, c.moe_intermediate_size, c.num_experts, c.num_experts_per_tok,
                         c.router_options())
    return DecoderLayer(c.hidden_size, c.rms_norm_eps, attention, moe, sparse=True)


class Qwen3MoeForCausalLM(CausalLM):
    def __init__(self, config: Qwen3MoeConfig):
        super().__init__()
        self.setup(config, [qwen3_moe_layer(config, i) for i in range(config.num_hidden_layers)])


class Qwen3MoeAdapter(StateDictAdapter):
    model_cls = Qwen3MoeForCausalLM  # the hub layout's names are the adapter's defaults


Qwen3MoeForCausalLM.adapter_cls = Qwen3MoeAdapter


PRESETS: dict[str, Qwen3MoeConfig] = {
    # Qwen/Qwen3-30B-A3B's config.json, trained with global-batch balancing (the class default above) and, as
    # far as is published, the config's router_aux_loss_coef 0.001 (the coefficient itself is not in the report).
    "qwen3-moe-30b-a3b": Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960, rope_theta=1e6,
        rms_norm_eps=1e-6, max_window_layers=48, tie_word_embeddings=False,
        bos_token_id=151643, eos_token_id=151645, router_aux_loss_coef=0.001,
    ),
    # For tests: about 370,000 parameters besides the embeddings, a dense first layer, the real vocabulary.
    "qwen3-moe-tiny": Qwen3MoeConfig(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, mlp_only_layers=(0,), max_position_embeddings=2048, rope_theta=1e6,
        bos_token_id=151643, eos_token_id=151643,
    ),
}
Qwen3MoeConfig.presets = PRESETS
