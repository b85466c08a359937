"""Mixtral: GQA attention (no biases, no QK-norm), every layer a sparse MoE block with softmax top-k routing
renormalised over the chosen experts.

Hugging Face layouts read: the hub layout of the published checkpoints (`block_sparse_moe.experts.{j}.w1/w2/w3`,
`block_sparse_moe.gate`) and the fused layout of transformers 5 (`mlp.experts.gate_up_proj`, `mlp.gate`).
Saving writes the hub layout.
"""

from __future__ import annotations

from moecpt.model.adapter import StateDictAdapter
from moecpt.model.base import CausalLM
from moecpt.model.config import MixtralConfig
from moecpt.model.layers import Attention, DecoderLayer
from moecpt.model.moe import SparseMoeBlock


def mixtral_layer(c: MixtralConfig, i: int) -> DecoderLayer:
    attention = Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.attn_head_dim, i,
                          window=c.sliding_window)
    router = {"norm_topk": True, "bias": c.router_bias_update_rate > 0}
    moe = SparseMoeBlock(c.hidden_size, c.intermediate_size, c.num_local_experts, c.num_experts_per_tok, router)
    return DecoderLayer(c.hidden_size, c.rms_norm_eps, attention, moe, sparse=True)


class MixtralForCausalLM(CausalLM):
    def __init__(self, config: MixtralConfig):
        super().__init__()
        self.setup(config, [mixtral_layer(config, i) for i in range(config.num_hidden_layers)])


class MixtralAdapter(StateDictAdapter):
    model_cls = MixtralForCausalLM
    hub_router = "block_sparse_moe.gate"
    hub_expert = "block_sparse_moe.experts.{j}."
    hub_projections = ("w1", "w3", "w2")


MixtralForCausalLM.adapter_cls = MixtralAdapter
