"""DeepSeek-V2 (DeepSeek-V2 236B, DeepSeek-V2-Lite 16B): DeepSeek-V3's multi-head latent attention and layer
layout (`moecpt.model.families.deepseek_v3`), with V2's routing and its own config field names:

- softmax scores over `n_routed_experts`; `topk_method` "greedy" takes the top `num_experts_per_tok`,
  "group_limited_greedy" only among the best `topk_group` of `n_group` groups, a group scored by its best
  expert; the weights are the chosen scores times `routed_scaling_factor`, never renormalised (transformers
  ignores `norm_topk_prob`, so a config asking for it is refused), and there is no selection bias in the format;
- RoPE always on interleaved pairs (transformers' complex rotation; moecpt rotates the same pairs);
- no multi-token prediction layers.

transformers computes no balancing loss here either. DeepSeek-V2 was pretrained with auxiliary balance losses
(arXiv:2405.04434, 2.2.3); V2-Lite's config.json says `aux_loss_alpha` 0.001 with `seq_aux`: moecpt continues
with a sequence-level load-balancing loss of coefficient alpha / top-k (0.001 / 6: the same loss in moecpt's
normalisation, read from `aux_loss_alpha` when config.json has it) and no selection bias (set
`router_bias_update_rate` > 0 for aux-loss-free balancing; its bias is then not exported).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from moecpt.errors import UserError
from moecpt.model.families.deepseek_v3 import DeepseekV3Adapter, DeepseekV3Config, DeepseekV3ForCausalLM
from moecpt.model.rope import Yarn

TOPK_METHODS = ("greedy", "group_limited_greedy")
V3_ONLY = ("rope_interleave", "num_nextn_predict_layers", "quantization_config")


@dataclass(frozen=True)
class DeepseekV2Config(DeepseekV3Config):
    """The fields of transformers' DeepseekV2Config, with its defaults (the DeepSeek-V3-only ones fixed)."""

    model_type: ClassVar[str] = "deepseek_v2"
    architecture: ClassVar[str] = "DeepseekV2ForCausalLM"
    hf_extras: ClassVar[dict[str, Any]] = {"attention_dropout": 0.0, "mlp_bias": False}
    group_rule: ClassVar[str] = "max"
    scoring: ClassVar[str] = "softmax"

    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    n_shared_experts: int = 2
    n_routed_experts: int = 64
    routed_scaling_factor: float = 1.0
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "greedy"
    num_experts_per_tok: int = 6
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    rope_interleave: bool = True  # not a V2 field: V2 always rotates interleaved pairs
    num_nextn_predict_layers: int = 0  # not a V2 field: V2 has no MTP
    # V2-Lite's aux_loss_alpha 0.001 over its top-6: DeepSeek's sequence-wise loss is moecpt's (transformers')
    # normalisation divided by top-k, so alpha corresponds to alpha / top-k here (docs/models.md).
    router_aux_loss_coef: float = 0.001 / 6
    router_bias_update_rate: float = 0.0
    router_balance_scope: str = "sequence"

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.topk_method not in TOPK_METHODS:
            problems.append(f"topk_method {self.topk_method!r} is not supported; use {' or '.join(TOPK_METHODS)}")
        if self.norm_topk_prob:
            problems.append("norm_topk_prob=true is ignored by transformers' DeepSeek-V2 (its weights are never "
                            "renormalised); set it to false")
        if not self.rope_interleave or self.num_nextn_predict_layers:
            problems.append("rope_interleave and num_nextn_predict_layers are DeepSeek-V3 settings")
        return problems

    def router_options(self) -> dict[str, Any]:
        grouped = self.topk_method == "group_limited_greedy"
        return super().router_options() | {"bias": self.router_bias_update_rate > 0, "norm_topk": False,
                                           "n_group": self.n_group if grouped else 1}

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json"):
        d = {k: v for k, v in d.items() if k not in V3_ONLY}
        if d.get("num_experts_per_tok") is None and "num_experts_per_tok" in d:
            raise UserError(f"{source}: num_experts_per_tok is null; set the experts per token")
        if d.get("aux_loss_alpha") is not None and "router_aux_loss_coef" not in d:  # a DeepSeek config.json
            d["router_aux_loss_coef"] = d["aux_loss_alpha"] / d.get("num_experts_per_tok", 6)
        return super().from_hf_dict(d, source)

    @classmethod
    def refuse_other_variants(cls, d: dict[str, Any], source: str) -> None:
        if d.get("mlp_bias"):
            raise UserError(f"{source}: mlp_bias=true is not supported (DeepSeek-V2 checkpoints have no MLP bias)")
        for key, value in {"scoring_func": "softmax", "moe_layer_freq": 1}.items():
            if key in d and d[key] != value:
                raise UserError(f"{source}: {key}={d[key]!r} is not supported for {cls.model_type} (only {value!r})")

    def to_hf_dict(self, dtype: str = "float32") -> dict[str, Any]:
        d = super().to_hf_dict(dtype)
        for key in V3_ONLY:
            d.pop(key, None)
        return d


class DeepseekV2ForCausalLM(DeepseekV3ForCausalLM):
    pass


class DeepseekV2Adapter(DeepseekV3Adapter):
    model_cls = DeepseekV2ForCausalLM
    bias_in_hf = False  # V2 routes without a selection bias: one moecpt trains is not exported (with a warning)


DeepseekV2ForCausalLM.adapter_cls = DeepseekV2Adapter


PRESETS: dict[str, DeepseekV2Config] = {
    # deepseek-ai/DeepSeek-V2-Lite's config.json (15.7B parameters, 2.4B active; YaRN to 160K from 4K with
    # mscale = mscale_all_dim = 0.707; aux_loss_alpha 0.001 with seq_aux: the sequence-level default above).
    "deepseek-v2-lite-16b": DeepseekV2Config(
        hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
        num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64,
        num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None,
        max_position_embeddings=163840, bos_token_id=100000, eos_token_id=100001,
        rope_scaling=Yarn(factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                          mscale=0.707, mscale_all_dim=0.707),
    ),
    # For tests: group-limited greedy routing (2 of 4 groups), no q low rank, a dense first layer.
    "deepseek-v2-tiny": DeepseekV2Config(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
        topk_group=2, topk_method="group_limited_greedy", first_k_dense_replace=1, kv_lora_rank=32,
        q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=2048,
    ),
}
DeepseekV2Config.presets = PRESETS
