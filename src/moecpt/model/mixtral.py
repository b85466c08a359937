"""The Mixtral decoder, written for one device and meant to be read top to bottom.

embed -> L x [RMSNorm -> GQA attention (RoPE) -> residual -> RMSNorm -> sparse MoE -> residual] -> RMSNorm -> LM head

The forward returns the losses separately (cross-entropy, load-balancing, router z-loss) together with the
per-expert token counts of every layer, so that a trainer can log them without recomputing anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moecpt.kernels.cross_entropy import linear_cross_entropy
from moecpt.kernels.rmsnorm import rms_norm
from moecpt.kernels.rope import apply_rope
from moecpt.model.config import MixtralConfig
from moecpt.model.moe import RouterStats, SparseMoeBlock, load_balancing_loss, router_z_loss

IGNORE_INDEX = -100


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None  # [B, T, V] (None with loss_only)
    loss: torch.Tensor | None  # ce_loss + aux coef * aux_loss + z coef * z_loss (with labels/targets)
    ce_loss: torch.Tensor | None  # mean cross-entropy over targets that are not IGNORE_INDEX
    aux_loss: torch.Tensor  # load-balancing loss as transformers defines it (before the coefficient)
    z_loss: torch.Tensor  # router z-loss (before its coefficient)
    num_targets: torch.Tensor | None  # how many targets the cross-entropy averaged over
    token_loss: torch.Tensor | None  # [B, T] fp32 cross-entropy of each target (0 where ignored)
    expert_counts: torch.Tensor  # [L, E] tokens routed to each expert (top-k assignments of real tokens)


class RMSNorm(nn.Module):
    """Normalise in fp32, round to the input dtype, scale (transformers' rule); `fused`: one Triton kernel."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.fused = False  # set by MixtralForCausalLM.use_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, fused=self.fused)


def rope_cos_sin(positions_BT: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables for the given positions, in fp32 (never in bf16: long positions lose their precision)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions_BT.device, dtype=torch.float32) / head_dim))
    freqs_BTD = positions_BT.float()[..., None] * inv_freq
    emb = torch.cat((freqs_BTD, freqs_BTD), dim=-1)
    return emb.cos()[:, :, None], emb.sin()[:, :, None]  # [B, T, 1, D]: broadcast over heads


class KVCache:
    """Preallocated keys and values for every layer; `length` positions are filled."""

    def __init__(self, config: MixtralConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (batch, config.num_key_value_heads, max_len, config.attn_head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: MixtralConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.attn_head_dim)
        H = config.hidden_size
        self.q_proj = nn.Linear(H, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, H, bias=False)
        self.fused_rope = False  # set by MixtralForCausalLM.use_kernels

    def forward(self, x_BTH, cos, sin, mask, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x_BTH.shape
        # RoPE in the projections' [B, T, heads, D] layout, then [B, heads, T, D] for SDPA.
        q = apply_rope(self.q_proj(x_BTH).view(B, T, self.n_heads, self.head_dim), cos, sin, self.fused_rope)
        k = apply_rope(self.k_proj(x_BTH).view(B, T, self.n_kv, self.head_dim), cos, sin, self.fused_rope)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x_BTH).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class DecoderLayer(nn.Module):
    def __init__(self, config: MixtralConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.moe = SparseMoeBlock(config.hidden_size, config.intermediate_size,
                                  config.num_local_experts, config.num_experts_per_tok)

    def forward(self, x, cos, sin, mask, token_mask, cache=None) -> tuple[torch.Tensor, RouterStats]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        moe_out, stats = self.moe(self.post_attention_layernorm(x), token_mask)
        return x + moe_out, stats


class MixtralForCausalLM(nn.Module):
    def __init__(self, config: MixtralConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.fused_loss = False  # the Triton cross-entropy in the chunked loss (use_kernels)
        self.loss_chunk_tokens: int | None = None  # tokens per chunk of the loss_only path (None: the default)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def use_kernels(self, fused: bool, loss_chunk_tokens: int | None = None) -> None:
        """Switch the fused Triton kernels (RMSNorm, RoPE, SwiGLU, cross-entropy) on or off. Each still falls
        back to its PyTorch reference where Triton cannot run (no Triton, or a CPU without TRITON_INTERPRET).
        `loss_chunk_tokens`: tokens per chunk of the chunked LM head + loss (None: the kernel's default)."""
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.fused = fused
            elif isinstance(m, Attention):
                m.fused_rope = fused
            elif isinstance(m, SparseMoeBlock):
                m.experts.fused = fused
        self.fused_loss = fused
        self.loss_chunk_tokens = loss_chunk_tokens

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, initializer_range) for every matrix (as transformers does), ones for the norms."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=generator)

    # ---- forward -----------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        intra_doc_attention: bool = False,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
        loss_only: bool = False,
    ) -> CausalLMOutput:
        """Logits and losses for a batch.

        - `attention_mask` [B, T]: 1 for real tokens, 0 for padding (left or right).
        - `labels` [B, T]: Hugging Face convention, the model shifts them (token t predicts labels[t + 1]).
          `targets` [B, T]: already shifted (token t predicts targets[t]), for packed `seq_len + 1` windows.
          IGNORE_INDEX (-100) entries take no part in the loss.
        - `position_ids` [B, T]: RoPE positions; with `intra_doc_attention`, a position 0 starts a new
          document and tokens attend only within their document (packed sequences).
        Padding (attention_mask 0, or else label -100) is excluded from the losses and the expert statistics.
        `logits_to_keep` > 0 computes logits for the last that many positions only (generation needs one).
        `loss_only` (training, with labels/targets): no logits; the LM head and cross-entropy run a chunk of
        tokens at a time (`moecpt.kernels.cross_entropy`), the same losses without [B, T, V] fp32 logits.
        """
        if labels is not None and targets is not None:
            raise ValueError("pass either labels (unshifted) or targets (shifted), not both")
        if loss_only and labels is None and targets is None:
            raise ValueError("loss_only needs labels or targets")
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        token_mask = None
        if attention_mask is not None:
            token_mask = attention_mask[:, -T:].bool()
        elif labels is not None:
            token_mask = labels != IGNORE_INDEX
        mask = self._attention_mask(input_ids, attention_mask, position_ids, intra_doc_attention, past)

        cos, sin = rope_cos_sin(position_ids, self.config.attn_head_dim, self.config.rope_theta)
        x = self.embed_tokens(input_ids)
        stats = []
        for layer in self.layers:
            x, s = layer(x, cos, sin, mask, token_mask, cache)
            stats.append(s)
        if cache is not None:
            cache.length += T
        if logits_to_keep:
            if labels is not None or targets is not None:
                raise ValueError("logits_to_keep cannot be combined with labels or targets")
            x = x[:, -logits_to_keep:]
        h = self.norm(x)
        logits = None if loss_only else self.lm_head(h)

        aux = load_balancing_loss(stats, self.config.num_local_experts)
        z = router_z_loss(stats)
        loss = ce = n = token_loss = None
        if labels is not None:
            targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        if targets is not None:
            if loss_only:
                token_loss = linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.lm_head.weight,
                                                  targets.reshape(-1), chunk_tokens=self.loss_chunk_tokens,
                                                  ignore_index=IGNORE_INDEX, fused=self.fused_loss)
            else:
                token_loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="none")
            token_loss = token_loss.view(targets.shape)
            n = (targets != IGNORE_INDEX).sum()
            ce = token_loss.sum() / n
            loss = ce + self.config.router_aux_loss_coef * aux
            if self.config.router_z_loss_coef:
                loss = loss + self.config.router_z_loss_coef * z
        counts = torch.stack([s.tokens_per_expert for s in stats])
        return CausalLMOutput(logits=logits, loss=loss, ce_loss=ce, aux_loss=aux, z_loss=z,
                              num_targets=n, token_loss=token_loss, expert_counts=counts)

    def _attention_mask(self, input_ids, attention_mask, position_ids, intra_doc, past) -> torch.Tensor | None:
        """None for plain causal attention (SDPA's fastest path), else a boolean [B, 1, Tq, Tk] mask."""
        B, T = input_ids.shape
        window = self.config.sliding_window
        needs_window = window is not None and past + T > window
        if attention_mask is None and not intra_doc and past == 0 and not needs_window:
            return None
        dev = input_ids.device
        q_idx = torch.arange(past, past + T, device=dev)[:, None]
        k_idx = torch.arange(past + T, device=dev)[None, :]
        allowed = (k_idx <= q_idx)[None]  # [1, Tq, Tk]
        if needs_window:
            allowed = allowed & (k_idx > q_idx - window)[None]
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, -(past + T):]
        if intra_doc:
            if past:
                raise ValueError("intra-document attention is not supported with a KV cache")
            doc = (position_ids == 0).cumsum(dim=1)
            allowed = allowed & (doc[:, :, None] == doc[:, None, :])
        # A query that may attend to nothing (a left-padding position) attends to itself instead of giving NaN.
        allowed = allowed | (k_idx == q_idx)[None]
        return allowed[:, None]

    # ---- generation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 16,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue a batch of left-padded prompts with a KV cache; returns [B, T + n] (prompt + new tokens).

        Greedy unless `do_sample`. A row stops at any id in `eos_token_id` (default: the config's EOS);
        rows that stopped are filled with `pad_token_id` until every row has stopped or n = max_new_tokens.
        """
        B, T = input_ids.shape
        dev = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if eos_token_id is None:
            eos_token_id = self.config.eos_token_id
        eos = torch.tensor([] if eos_token_id is None else
                           [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=dev)
        if pad_token_id is None:
            pad_token_id = self.config.pad_token_id if self.config.pad_token_id is not None else (
                int(eos[0]) if len(eos) else 0)
        if T + max_new_tokens > self.config.max_position_embeddings:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds max_position_embeddings "
                             f"({self.config.max_position_embeddings}); truncate the prompt")
        dtype = next(self.parameters()).dtype
        cache = KVCache(self.config, B, T + max_new_tokens, dtype, dev)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        key_mask = attention_mask.long()
        logits = self(input_ids, attention_mask=key_mask, position_ids=positions, cache=cache,
                      logits_to_keep=1).logits[:, -1]
        next_pos = positions[:, -1:] + 1
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        new_tokens = []
        for step in range(max_new_tokens):
            tok = self._pick(logits.float(), do_sample, temperature, top_k, generator)
            tok = torch.where(finished, torch.full_like(tok, pad_token_id), tok)
            new_tokens.append(tok)
            finished |= torch.isin(tok, eos)
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            key_mask = torch.cat([key_mask, torch.ones_like(key_mask[:, :1])], dim=1)
            logits = self(tok[:, None], attention_mask=key_mask, position_ids=next_pos, cache=cache).logits[:, -1]
            next_pos = next_pos + 1
        return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1) if new_tokens else input_ids

    @staticmethod
    def _pick(logits_BV, do_sample, temperature, top_k, generator) -> torch.Tensor:
        if not do_sample or temperature == 0:
            return logits_BV.argmax(dim=-1)
        logits_BV = logits_BV / temperature
        if top_k is not None:
            kth = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
            logits_BV = logits_BV.masked_fill(logits_BV < kth, -math.inf)
        return torch.multinomial(logits_BV.softmax(-1), 1, generator=generator).squeeze(1)

    # ---- Hugging Face interop ----------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | Path, max_shard_size: str | int = "5GB",
                        dtype: torch.dtype | None = None) -> None:
        """Write a Hugging Face directory (hub layout, safetensors) that transformers loads unchanged."""
        from moecpt.model.hf import save_pretrained

        save_pretrained(self, out_dir, max_shard_size=max_shard_size, dtype=dtype)

    def num_params(self, active: bool = False) -> int:
        """Parameters counted once (tied ones too); `active`: only those a token uses (top-k of E experts)."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        c = self.config
        expert = 3 * c.hidden_size * c.intermediate_size
        return total - c.num_hidden_layers * (c.num_local_experts - c.num_experts_per_tok) * expert
