"""The one loss of every model family, used by training, validation, held-out evaluation and the Hugging
Face-style `model(ids, labels=ids)` alike:

    loss = sum_t w_ce * CE(h_t W^T, target_t) + w_router * (aux_coef * load_balancing + z_coef * z_loss)

The LM head and cross-entropy run a chunk of tokens at a time (`moecpt.kernels.cross_entropy`), so no caller
ever holds [tokens, vocab] logits in fp32. Also here: bits per byte, the held-out measure built on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moecpt.config import IGNORE_INDEX
from moecpt.kernels.cross_entropy import linear_cross_entropy
from moecpt.model.config import BALANCE_SCOPES
from moecpt.model.moe import RouterStats


@dataclass
class LossOutput:
    token_loss: torch.Tensor  # [B, T] fp32 cross-entropy of each target (0 where IGNORE_INDEX)
    num_targets: torch.Tensor  # [] targets that are not IGNORE_INDEX
    aux_loss: torch.Tensor  # load-balancing loss as transformers defines it (before its coefficient)
    z_loss: torch.Tensor  # router z-loss (before its coefficient)
    expert_counts: torch.Tensor  # [L, E] tokens routed to each expert (top-k assignments of real tokens)
    aux_coef: float = 0.0
    z_coef: float = 0.0
    mtp_loss: torch.Tensor | None = None  # multi-token prediction: summed CE of the extra depths, depth mean
    mtp_coef: float = 0.0

    def objective(self, ce_weight: torch.Tensor | float, router_weight: float = 1.0) -> torch.Tensor:
        """What to differentiate: ce_weight x (summed CE + mtp_coef x the MTP loss) + router_weight x the
        weighted router losses (a trainer passes 1 / global target count and 1 / micro-batches, so the
        gradient does not depend on how the global batch is split)."""
        router = self.aux_coef * self.aux_loss
        if self.z_coef:
            router = router + self.z_coef * self.z_loss
        ce = self.token_loss.sum()
        if self.mtp_loss is not None and self.mtp_coef:
            ce = ce + self.mtp_coef * self.mtp_loss
        return ce * ce_weight + router_weight * router

    @property
    def ce_loss(self) -> torch.Tensor:
        """Mean cross-entropy over the targets that are not IGNORE_INDEX."""
        return self.token_loss.sum() / self.num_targets

    @property
    def loss(self) -> torch.Tensor:
        """Mean cross-entropy plus the weighted router losses (the Hugging Face `loss`)."""
        return self.objective(1.0 / self.num_targets)


def load_balancing_loss(stats: list[RouterStats], num_experts: int, scope: str = "micro_batch",
                        group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The Switch/Mixtral auxiliary loss E * sum_e f_e * P_e (before the coefficient), with assignment
    fractions f and mean router probabilities P pooled over all MoE layers' tokens, as transformers computes
    it. `scope` says over which tokens f and P are taken:
    - "micro_batch": this forward's tokens (transformers and Megatron);
    - "sequence": each sequence alone, then the mean over sequences;
    - "global": f from the expert counts summed over the ranks of `group` (the data-parallel ranks) before
      the product, P from this forward's tokens (Qwen3's global-batch balancing); with `group` None, as
      "micro_batch"."""
    tokens_BE = torch.stack([s.tokens_per_expert for s in stats]).sum(0)
    probs_BE = torch.stack([s.prob_sum for s in stats]).sum(0)
    rows_B = torch.stack([s.num_tokens for s in stats]).sum(0)
    if scope == "sequence":
        rows = rows_B.clamp_min(1.0)[:, None]
        return num_experts * ((tokens_BE / rows) * (probs_BE / rows)).sum(-1).mean()
    tokens_E, probs_E, rows = tokens_BE.sum(0), probs_BE.sum(0), rows_B.sum()
    f_E = tokens_E / rows.clamp_min(1.0)
    if scope == "global" and group is not None:
        counts = torch.cat([tokens_E, rows[None]]).detach()
        dist.all_reduce(counts, group=group)
        f_E = counts[:-1] / counts[-1].clamp_min(1.0)
    return num_experts * torch.sum(f_E * (probs_E / rows.clamp_min(1.0)))


def router_z_loss(stats: list[RouterStats]) -> torch.Tensor:
    """ST-MoE router z-loss: mean over real tokens and MoE layers of logsumexp(router logits)^2."""
    z = torch.stack([s.z_sum.sum() for s in stats]).sum()
    return z / torch.stack([s.num_tokens.sum() for s in stats]).sum().clamp_min(1.0)


class LMLoss:
    """Chunked LM head + cross-entropy + load-balancing + z-loss, configured once when the model is built."""

    def __init__(self, num_experts: int, aux_coef: float, z_coef: float, scope: str = "micro_batch"):
        if scope not in BALANCE_SCOPES:
            raise ValueError(f"load-balancing scope {scope!r}: choose one of {', '.join(BALANCE_SCOPES)}")
        self.num_experts, self.aux_coef, self.z_coef, self.scope = num_experts, aux_coef, z_coef, scope
        self.group: dist.ProcessGroup | None = None  # the data-parallel ranks of the "global" scope (trainer)
        self.chunk_tokens: int | None = None  # tokens per chunk (None: the kernel's CHUNK_TOKENS)
        self.fused = False  # the Triton cross-entropy (set once by CausalLM.use_kernels)

    def router_losses(self, stats: list[RouterStats]) -> tuple[torch.Tensor, torch.Tensor]:
        """(load-balancing loss, z-loss), before their coefficients."""
        return load_balancing_loss(stats, self.num_experts, self.scope, self.group), router_z_loss(stats)

    def token_losses(self, h_BTH: torch.Tensor, head_VH: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
        """[B, T] fp32 cross-entropy of each target (0 where IGNORE_INDEX), the LM head applied chunk by chunk."""
        token_loss = linear_cross_entropy(h_BTH.reshape(-1, h_BTH.shape[-1]), head_VH, targets_BT.reshape(-1),
                                          chunk_tokens=self.chunk_tokens, ignore_index=IGNORE_INDEX,
                                          fused=self.fused)
        return token_loss.view(targets_BT.shape)

    def __call__(self, h_BTH: torch.Tensor, head_VH: torch.Tensor, targets_BT: torch.Tensor,
                 stats: list[RouterStats]) -> LossOutput:
        aux, z = self.router_losses(stats)
        return LossOutput(self.token_losses(h_BTH, head_VH, targets_BT), (targets_BT != IGNORE_INDEX).sum(), aux,
                          z, expert_counts(stats), self.aux_coef, self.z_coef)


def expert_counts(stats: list[RouterStats]) -> torch.Tensor:
    """[MoE layers, E] tokens routed to each expert of each MoE layer."""
    return torch.stack([s.tokens_per_expert.sum(0) for s in stats])


def shift_labels(labels_BT: torch.Tensor) -> torch.Tensor:
    """Hugging Face labels (token t predicts labels[t + 1]) as targets (token t predicts targets[t])."""
    return torch.nn.functional.pad(labels_BT[:, 1:], (0, 1), value=IGNORE_INDEX)


def bits_per_byte(nats: float, num_bytes: int) -> float:
    """Summed cross-entropy in nats over a text, per UTF-8 byte of that text, in bits: comparable across
    tokenizers."""
    return nats / math.log(2) / max(num_bytes, 1)
