"""OLMoE (allenai/OLMoE-1B-7B): attention with an RMSNorm over the whole q projection and the whole k
projection (not per head), before RoPE; optionally q, k and v clamped to [-clip_qkv, clip_qkv] after the
norms; biases on all four projections when `attention_bias`; every layer a sparse MoE block of `num_experts`
experts of `intermediate_size`, softmax top-k routing not renormalised unless `norm_topk_prob`.

Read from transformers' `models/olmoe` (5.x): q_norm spans hidden_size (= heads x head size), k_norm
kv heads x head size; the head size is hidden_size / num_attention_heads (no head_dim field); full causal
attention in every layer. transformers computes the load-balancing loss only; OLMoE was also pretrained with
the router z-loss, which moecpt adds with `router_z_loss_coef` (see the preset).

Hugging Face layouts read: the hub layout of the published checkpoints (`mlp.experts.{j}.gate_proj/up_proj/
down_proj`, router `mlp.gate`, `self_attn.q_norm`/`k_norm`) and the fused layout of transformers 5
(`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`). Saving writes the hub layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from moecpt.model.adapter import StateDictAdapter
from moecpt.model.base import CausalLM
from moecpt.model.config import FamilyConfig
from moecpt.model.layers import Attention, DecoderLayer
from moecpt.model.moe import SparseMoeBlock


@dataclass(frozen=True)
class OlmoeConfig(FamilyConfig):
    """The fields of transformers' OlmoeConfig, with its defaults (its num_key_value_heads None, meaning
    num_attention_heads, is resolved when config.json is read)."""

    model_type: ClassVar[str] = "olmoe"
    architecture: ClassVar[str] = "OlmoeForCausalLM"
    hf_extras: ClassVar[dict[str, Any]] = {"attention_dropout": 0.0}

    vocab_size: int = 50304
    hidden_size: int = 2048
    intermediate_size: int = 2048  # per expert
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    num_experts: int = 64
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = False
    attention_bias: bool = False
    clip_qkv: float | None = None
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    router_aux_loss_coef: float = 0.01
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = 50279
    pad_token_id: int | None = 1
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        clip = [] if self.clip_qkv is None or self.clip_qkv > 0 else [f"clip_qkv must be positive or null, got "
                                                                       f"{self.clip_qkv}"]
        self.raise_problems(self.shape_problems((
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "num_experts", "num_experts_per_tok")) + clip)

    @property
    def n_experts(self) -> int:
        return self.num_experts

    @property
    def expert_ffn(self) -> int:
        return self.intermediate_size


def olmoe_layer(c: OlmoeConfig, i: int) -> DecoderLayer:
    attention = Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.attn_head_dim, i,
                          qkv_bias=c.attention_bias, o_bias=c.attention_bias, qk_norm="full",
                          norm_eps=c.rms_norm_eps, clip_qkv=c.clip_qkv)
    moe = SparseMoeBlock(c.hidden_size, c.intermediate_size, c.num_experts, c.num_experts_per_tok, c.router_options())
    return DecoderLayer(c.hidden_size, c.rms_norm_eps, attention, moe, sparse=True)


class OlmoeForCausalLM(CausalLM):
    def __init__(self, config: OlmoeConfig):
        super().__init__()
        self.setup(config, [olmoe_layer(config, i) for i in range(config.num_hidden_layers)])


class OlmoeAdapter(StateDictAdapter):
    model_cls = OlmoeForCausalLM  # the hub layout's names are the adapter's defaults


OlmoeForCausalLM.adapter_cls = OlmoeAdapter


PRESETS: dict[str, OlmoeConfig] = {
    # allenai/OLMoE-1B-7B-0924's config.json (6.9B parameters, 1.3B active). Pretrained (OLMoE paper,
    # arXiv:2409.02060, and its training config) with MegaBlocks' load-balancing loss at weight 0.01 and router
    # z-loss at 0.001, each over a device's micro-batch (8 x 4096 tokens): the scope is known. MegaBlocks'
    # balancing loss takes expert fractions over the top_k x T assignments (transformers' over T tokens, so
    # top_k = 8 times larger): the same push here is 0.01 / 8. Its z-loss is reported (not checked here) to be
    # divided by top_k as well; moecpt keeps the published 0.001, a guess that errs on the stable side.
    "olmoe-1b-7b": OlmoeConfig(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
        norm_topk_prob=False, attention_bias=False, clip_qkv=None, max_position_embeddings=4096,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=50279, pad_token_id=1, router_aux_loss_coef=0.01 / 8, router_z_loss_coef=0.001,
        router_balance_scope="micro_batch",
    ),
    # For tests: a few hundred thousand parameters besides the embeddings, fine-grained (16 experts, top-4).
    "olmoe-tiny": OlmoeConfig(
        vocab_size=32000, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=16, num_experts_per_tok=4, max_position_embeddings=2048,
        eos_token_id=2, pad_token_id=0, router_z_loss_coef=0.001,
    ),
}
OlmoeConfig.presets = PRESETS
