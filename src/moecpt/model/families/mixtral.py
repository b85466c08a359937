"""Mixtral: the decoder wiring, its Hugging Face state-dict adapter and its initialisation rule.

embed -> L x [RMSNorm -> GQA attention (RoPE) -> residual -> RMSNorm -> sparse MoE -> residual] -> RMSNorm -> LM head

Hugging Face layouts read: the hub layout of the published checkpoints (`block_sparse_moe.experts.{j}.w1/w2/w3`,
`block_sparse_moe.gate`) and the stacked layout of transformers 5 modules (`mlp.experts.gate_up_proj` [E, 2F, H],
`mlp.experts.down_proj` [E, H, F], `mlp.gate`). Saving writes the hub layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from moecpt.errors import UserError
from moecpt.model.base import CausalLM
from moecpt.model.config import MixtralConfig
from moecpt.model.layers import Attention, KVCache, RMSNorm, rope_cos_sin, sdpa_mask
from moecpt.model.loss import LMLoss
from moecpt.model.moe import RouterStats, SparseMoeBlock


class DecoderLayer(nn.Module):
    def __init__(self, config: MixtralConfig, layer: int):
        super().__init__()
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.attn_head_dim, layer)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.moe = SparseMoeBlock(c.hidden_size, c.intermediate_size, c.num_local_experts, c.num_experts_per_tok)

    def forward(self, x, cos, sin, mask, token_mask, cache=None) -> tuple[torch.Tensor, RouterStats]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        moe_out, stats = self.moe(self.post_attention_layernorm(x), token_mask)
        return x + moe_out, stats


class MixtralForCausalLM(CausalLM):
    def __init__(self, config: MixtralConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.loss_fn = LMLoss(config.num_local_experts, config.router_aux_loss_coef, config.router_z_loss_coef)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def init_rule(self, name: str) -> str:
        """Norms start at one, every matrix at normal(0, initializer_range) (as transformers does)."""
        return "ones" if name.endswith("layernorm.weight") or name == "norm.weight" else "normal"

    def trunk(self, input_ids, attention_mask, position_ids, intra_doc_attention, cache: KVCache | None,
              token_mask) -> tuple[torch.Tensor, list[RouterStats]]:
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        mask = sdpa_mask(input_ids, attention_mask, position_ids, intra_doc_attention, past,
                         self.config.sliding_window)
        cos, sin = rope_cos_sin(position_ids, self.config.attn_head_dim, self.config.rope_theta)
        x = self.embed_tokens(input_ids)
        stats = []
        for layer in self.layers:
            x, s = layer(x, cos, sin, mask, token_mask, cache)
            stats.append(s)
        if cache is not None:
            cache.length += T
        return self.norm(x), stats


class MixtralAdapter:
    """moecpt parameter names and shapes (the one table loading, saving, sharding and `moecpt plan` use),
    and their Hugging Face names in each layout."""

    layouts = ("hub", "stacked")

    def __init__(self, config: MixtralConfig):
        self.config = config

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every moecpt parameter with its shape, in the model's parameter order (tied ones once)."""
        c = self.config
        H, F, E, V = c.hidden_size, c.intermediate_size, c.num_local_experts, c.vocab_size
        q, kv = c.num_attention_heads * c.attn_head_dim, c.num_key_value_heads * c.attn_head_dim
        shapes = {"embed_tokens.weight": (V, H)}
        for i in range(c.num_hidden_layers):
            p = f"layers.{i}."
            shapes |= {p + "input_layernorm.weight": (H,), p + "self_attn.q_proj.weight": (q, H),
                       p + "self_attn.k_proj.weight": (kv, H), p + "self_attn.v_proj.weight": (kv, H),
                       p + "self_attn.o_proj.weight": (H, q), p + "post_attention_layernorm.weight": (H,),
                       p + "moe.gate.weight": (E, H), p + "moe.experts.gate_up_proj": (E, 2 * F, H),
                       p + "moe.experts.down_proj": (E, H, F)}
        shapes["norm.weight"] = (H,)
        if not c.tie_word_embeddings:
            shapes["lm_head.weight"] = (V, H)
        return shapes

    def hf_name(self, name: str, layout: str) -> str:
        """The Hugging Face name of a non-expert moecpt parameter."""
        if name == "lm_head.weight":
            return name
        if name.endswith("moe.gate.weight"):
            return "model." + name.replace("moe.gate", "block_sparse_moe.gate" if layout == "hub" else "mlp.gate")
        return "model." + name

    def hf_shapes(self, layout: str) -> dict[str, tuple[int, ...]]:
        """Every Hugging Face tensor of this config in `layout`, with its shape."""
        out = {}
        for name, shape in self.param_shapes().items():
            if ".experts." not in name:
                out[self.hf_name(name, layout)] = shape
            elif layout == "stacked":
                out["model." + name.replace(".moe.", ".mlp.")] = shape
            elif name.endswith("gate_up_proj"):
                E, F2, H = shape
                for j in range(E):
                    moe = "model." + name.replace("moe.experts.gate_up_proj", f"block_sparse_moe.experts.{j}.")
                    out |= {moe + "w1.weight": (F2 // 2, H), moe + "w3.weight": (F2 // 2, H)}
            else:
                E, H, F = shape
                for j in range(E):
                    out["model." + name.replace("moe.experts.down_proj", f"block_sparse_moe.experts.{j}.w2.weight")] = (H, F)
        return out

    def optional_hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensors a checkpoint may carry beyond the expected ones: a tied model's copy of the embedding."""
        c = self.config
        return {"lm_head.weight": (c.vocab_size, c.hidden_size)} if c.tie_word_embeddings else {}

    def detect_layout(self, names: set[str]) -> str:
        hub = any(".block_sparse_moe." in n for n in names)
        stacked = any(".mlp.experts." in n or ".mlp.gate." in n for n in names)
        if hub and stacked:
            raise UserError("checkpoint mixes the hub expert layout (block_sparse_moe.experts.*) and the stacked "
                            "transformers-5 layout (mlp.experts.*); re-save it with one layout")
        return "stacked" if stacked else "hub"

    def from_hf(self, get: Callable[[str], torch.Tensor], layout: str) -> Iterator[tuple[str, torch.Tensor]]:
        """(moecpt name, tensor) for every parameter, reading Hugging Face tensors with `get(name)` and
        stacking hub-layout experts into [E, ...] tensors."""
        E = self.config.num_local_experts
        for name in self.param_shapes():
            if ".experts." not in name:
                yield name, get(self.hf_name(name, layout))
            elif layout == "stacked":
                yield name, get("model." + name.replace(".moe.", ".mlp."))
            else:
                moe = "model." + name.split("moe.experts.")[0] + "block_sparse_moe.experts."
                if name.endswith("gate_up_proj"):
                    yield name, torch.stack([torch.cat([get(f"{moe}{j}.w1.weight"), get(f"{moe}{j}.w3.weight")])
                                             for j in range(E)])
                else:
                    yield name, torch.stack([get(f"{moe}{j}.w2.weight") for j in range(E)])

    def to_hf(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """moecpt parameters renamed and split into the hub layout (each expert's w1, w2, w3)."""
        out = {}
        F = self.config.intermediate_size
        for name in self.param_shapes():
            t = state[name]
            if ".experts." not in name:
                out[self.hf_name(name, "hub")] = t
                continue
            moe = "model." + name.split("moe.experts.")[0] + "block_sparse_moe.experts."
            for j in range(t.shape[0]):
                if name.endswith("gate_up_proj"):
                    out[f"{moe}{j}.w1.weight"], out[f"{moe}{j}.w3.weight"] = t[j, :F], t[j, F:]
                else:
                    out[f"{moe}{j}.w2.weight"] = t[j]
        return out


MixtralForCausalLM.adapter_cls = MixtralAdapter
