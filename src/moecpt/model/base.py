"""What every model family shares: the Hugging Face-style call, the loss, generation, kernels, the
initialisation and saving. A family subclasses `CausalLM` and writes `trunk` (embeddings to the final norm)
and its parameter rules; see `moecpt.model.families`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from moecpt.config import IGNORE_INDEX
from moecpt.kernels.support import triton_usable
from moecpt.model import hf
from moecpt.model.layers import Attention, KVCache, RMSNorm, sdpa_mask
from moecpt.model.loss import LMLoss, LossOutput, expert_counts, shift_labels
from moecpt.model.moe import Experts, RouterStats, SparseMoeBlock
from moecpt.model.rope import rope_tables


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, T, V] (or the last `logits_to_keep` positions)
    loss: torch.Tensor | None  # with labels: mean CE + aux coef x aux_loss + z coef x z_loss
    ce_loss: torch.Tensor | None  # with labels: mean cross-entropy over targets that are not IGNORE_INDEX
    aux_loss: torch.Tensor  # load-balancing loss as transformers defines it (before the coefficient)
    z_loss: torch.Tensor  # router z-loss (before its coefficient)
    num_targets: torch.Tensor | None
    token_loss: torch.Tensor | None  # [B, T] fp32 cross-entropy of each target (0 where ignored)
    expert_counts: torch.Tensor  # [L, E] tokens routed to each expert


class CausalLM(nn.Module):
    """A decoder with an LM head. A family's subclass builds its decoder layers and calls `setup`; it may
    override `init_rule` and `rope`."""

    config: Any
    loss_fn: LMLoss
    adapter_cls: type  # the family's Hugging Face state-dict adapter (moecpt.model.families)

    def trunk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
              intra_doc_attention: bool, cache: KVCache | None, token_mask: torch.Tensor | None
              ) -> tuple[torch.Tensor, list[RouterStats]]:
        """Final-norm hidden states [B, T, H] and each MoE layer's router statistics (over `token_mask`'s
        tokens: True = real; None = all)."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        cos, sin = self.rope(position_ids)
        masks: dict[int | None, torch.Tensor | None] = {}  # one mask per attention window in use
        x = self.embed_tokens(input_ids)
        stats = []
        for layer in self.layers:
            window = layer.self_attn.window
            if window not in masks:
                masks[window] = sdpa_mask(input_ids, attention_mask, position_ids, intra_doc_attention, past, window)
            x, s = layer(x, cos, sin, masks[window], token_mask, cache)
            if s is not None:
                stats.append(s)
        if cache is not None:
            cache.length += T
        return self.norm(x), stats

    def rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The RoPE tables of the positions (families with another RoPE override this)."""
        return rope_tables(position_ids, self.config.attn_head_dim, self.config.rope_theta)

    def setup(self, config, layers: list[nn.Module]) -> None:
        """The parts every family has around its layers: embeddings, final norm, LM head (tied or not), the
        loss, and the initialisation when the model is not built on the meta device."""
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.loss_fn = LMLoss(config.n_experts, config.router_aux_loss_coef, config.router_z_loss_coef,
                              config.router_balance_scope)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def init_rule(self, name: str) -> str:
        """How parameter `name` starts: "ones" (norms), "zeros" (biases) or "normal" (normal(0,
        initializer_range), as transformers initialises every matrix)."""
        if name.endswith("norm.weight"):
            return "ones"
        return "zeros" if name.endswith(".bias") else "normal"

    # ---- the call -----------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, intra_doc_attention: bool = False,
                cache: KVCache | None = None, logits_to_keep: int = 0) -> CausalLMOutput | LossOutput:
        """Two uses, one loss (`moecpt.model.loss`):
        - `targets` [B, T] (already shifted, IGNORE_INDEX for none): the losses alone, a `LossOutput`, with no
          [B, T, V] logits (training, validation, held-out evaluation);
        - otherwise the Hugging Face call: logits, and with `labels` (unshifted) the loss too.
        `attention_mask` [B, T]: 1 real, 0 padding (left or right); padding (or else label -100) takes no
        part in the losses and router statistics. `position_ids`: RoPE positions; with `intra_doc_attention`
        a position 0 starts a new document and tokens attend only within it. `logits_to_keep` > 0: logits
        of the last that many positions only (generation)."""
        if labels is not None and targets is not None:
            raise ValueError("pass either labels (unshifted) or targets (shifted), not both")
        if logits_to_keep and (labels is not None or targets is not None):
            raise ValueError("logits_to_keep cannot be combined with labels or targets")
        T = input_ids.shape[1]
        token_mask = (attention_mask[:, -T:].bool() if attention_mask is not None
                      else labels != IGNORE_INDEX if labels is not None else None)
        h, stats = self.trunk(input_ids, attention_mask, position_ids, intra_doc_attention, cache, token_mask)
        if targets is not None:
            return self.losses(h, input_ids, targets, stats, attention_mask, position_ids, intra_doc_attention,
                               token_mask)
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        if labels is None:
            aux, z = self.loss_fn.router_losses(stats)
            return CausalLMOutput(logits, None, None, aux, z, None, None, expert_counts(stats))
        out = self.losses(h, input_ids, shift_labels(labels), stats, attention_mask, position_ids,
                          intra_doc_attention, token_mask)
        return CausalLMOutput(logits, out.loss, out.ce_loss, out.aux_loss, out.z_loss, out.num_targets,
                              out.token_loss, out.expert_counts)

    def losses(self, h, input_ids, targets, stats, attention_mask, position_ids, intra_doc_attention,
               token_mask) -> LossOutput:
        """The one loss over the final hidden states, with a family's multi-token prediction loss (and its
        layers' router statistics) when it has one (`mtp_loss`), in training mode only: a training signal, it
        is not run in eval mode (validation, evaluation), where every rank then runs the same modules whether it
        passes targets or not (a sharded MTP layer's collectives would otherwise wait on a rank that does not)."""
        mtp, mtp_stats = (self.mtp_loss(h, input_ids, targets, attention_mask, position_ids, intra_doc_attention,
                                        token_mask) if self.training else (None, []))
        out = self.loss_fn(h, self.lm_head.weight, targets, stats + mtp_stats)
        if mtp is not None:
            out.mtp_loss, out.mtp_coef = mtp, self.config.mtp_loss_coef
        return out

    def mtp_loss(self, h, input_ids, targets, attention_mask, position_ids, intra_doc_attention, token_mask
                 ) -> tuple[torch.Tensor | None, list[RouterStats]]:
        """Multi-token prediction (families that have it override this): its summed cross-entropy and its MoE
        layers' router statistics; (None, []) for none."""
        return None, []

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when the config ties them (again after `to_empty`, which
        unties them; a sharded model's parameters are left as its parallelisation made them)."""
        if self.config.tie_word_embeddings and not isinstance(self.embed_tokens.weight, DTensor):
            self.lm_head.weight = self.embed_tokens.weight

    # ---- build-time settings ------------------------------------------------------------------------------
    def use_kernels(self, fused: bool, loss_chunk_tokens: int | None = None,
                    device: torch.device | str | None = None) -> bool:
        """Choose the kernels once: the fused Triton ones (RMSNorm, RoPE, SwiGLU, cross-entropy) when `fused`
        and Triton can run on `device` (default: the parameters'; a CPU needs TRITON_INTERPRET=1), else the
        PyTorch references. `loss_chunk_tokens`: tokens per chunk of the LM head + loss (None: the kernel's
        default). Returns whether the fused kernels are on."""
        if device is None:
            device = next(self.parameters()).device
        fused = bool(fused) and triton_usable(device)
        for m in self.modules():
            if isinstance(m, RMSNorm | Experts):
                m.fused = fused
            elif isinstance(m, Attention):
                m.fused_rope = fused
        self.loss_fn.fused = fused
        self.loss_fn.chunk_tokens = loss_chunk_tokens
        return fused

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Every parameter by the family's `init_rule`, each full tensor drawn in fp32 on the CPU in parameter
        order from `generator` (default: torch's global one): the same weights on one process and on any
        number of ranks, where each rank keeps its slice of a sharded (DTensor) parameter."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            full = torch.empty(p.shape, dtype=torch.float32)
            rule = self.init_rule(name)
            if rule == "normal":
                full.normal_(0.0, std, generator=generator)
            else:
                full.fill_(1.0 if rule == "ones" else 0.0)
            if isinstance(p, DTensor):
                local, full = p.to_local(), _local_slice(p, full)
            else:
                local = p
            local.copy_(full)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Router selection biases start at zero (they are state, not parameters: always set after a build
        on the meta device, whether or not weights are loaded next)."""
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()

    def num_params(self, active: bool = False) -> int:
        """Parameters counted once (tied ones too); `active`: only those a token uses (top-k of E experts)."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        idle = 0
        for m in self.modules():
            if isinstance(m, SparseMoeBlock):
                idle += sum(p.numel() for p in m.experts.parameters()) * (m.num_experts - m.top_k) // m.num_experts
        return total - idle

    # ---- generation ---------------------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, c.num_key_value_heads, c.attn_head_dim, batch, max_len, dtype, device)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 16, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue a batch of left-padded prompts with a KV cache; returns [B, T + n] (prompt + new tokens).

        Greedy unless `do_sample`. A row stops at any id in `eos_token_id` (default: the config's EOS);
        rows that stopped are filled with `pad_token_id` until every row has stopped or n = max_new_tokens.
        """
        B, T = input_ids.shape
        if T + max_new_tokens > self.config.max_position_embeddings:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds max_position_embeddings "
                             f"({self.config.max_position_embeddings}); truncate the prompt")
        eos, pad_token_id = self._stop_ids(eos_token_id, pad_token_id, input_ids.device)
        key_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        cache = self.new_cache(B, T + max_new_tokens, next(self.parameters()).dtype, input_ids.device)
        positions = (key_mask.cumsum(-1) - 1).clamp_min(0)
        logits = self(input_ids, attention_mask=key_mask, position_ids=positions, cache=cache,
                      logits_to_keep=1).logits[:, -1]
        next_pos = positions[:, -1:] + 1
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        new_tokens = []
        for step in range(max_new_tokens):
            tok = _pick(logits.float(), do_sample, temperature, top_k, generator)
            tok = torch.where(finished, torch.full_like(tok, pad_token_id), tok)
            new_tokens.append(tok)
            finished |= torch.isin(tok, eos)
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            key_mask = torch.cat([key_mask, torch.ones_like(key_mask[:, :1])], dim=1)
            logits = self(tok[:, None], attention_mask=key_mask, position_ids=next_pos, cache=cache).logits[:, -1]
            next_pos = next_pos + 1
        return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1) if new_tokens else input_ids

    def _stop_ids(self, eos_token_id, pad_token_id, device) -> tuple[torch.Tensor, int]:
        """The ids that end a row, and the id that fills rows that ended."""
        if eos_token_id is None:
            eos_token_id = self.config.eos_token_id
        ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if pad_token_id is None:
            pad_token_id = self.config.pad_token_id if self.config.pad_token_id is not None else (
                ids[0] if ids else 0)
        return torch.tensor(ids, device=device), int(pad_token_id)

    # ---- Hugging Face interop -----------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | Path, max_shard_size: str | int = "5GB",
                        dtype: torch.dtype | None = None) -> None:
        """Write a Hugging Face directory (the hub layout, safetensors) that transformers loads unchanged."""
        tensors = self.adapter_cls(self.config).to_hf(self.state_dict())
        hf.save_pretrained(tensors, self.config, out_dir, max_shard_size=max_shard_size, dtype=dtype)


def _pick(logits_BV: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
          generator: torch.Generator | None) -> torch.Tensor:
    if not do_sample or temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV / temperature
    if top_k is not None:
        kth = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, -math.inf)
    return torch.multinomial(logits_BV.softmax(-1), 1, generator=generator).squeeze(1)


def _local_slice(param: DTensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of `full` for a sharded (DTensor) parameter."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(full.shape, param.device_mesh, param.placements)
    return full[tuple(slice(o, o + n) for n, o in zip(shape, offset, strict=True))]
