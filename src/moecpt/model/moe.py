"""The sparse mixture-of-experts feed-forward block of Mixtral.

Each token is routed to its top-k experts (softmax over the router logits in fp32, top-k, renormalised: the
Mixtral rule). Tokens are permuted so that each expert's tokens are contiguous, all experts run as one grouped
GEMM (dropless: every token is computed), and the outputs are weighted and summed back per token.

Shapes in names: T tokens, H hidden, F expert ffn, E experts, K experts per token, N = T * K routed rows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moecpt.kernels.swiglu import swiglu

GROUP_RULES = ("top2_sum", "max")  # how a group of experts is scored for group-limited routing (Router)
_NATIVE_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def _native_grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM kernel takes these operands (it has dtype, device and alignment limits)."""
    if _NATIVE_GROUPED_MM is None:
        return False
    if x.device.type == "cuda":
        return (x.dtype == w.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
                and _aligned16(x) and _aligned16(w))
    if x.device.type == "cpu" and _TORCH_VERSION >= (2, 9):
        # The CPU kernel takes any float dtype, but torch.compile's shape rule for the op admits bf16 only.
        dtype_ok = x.dtype == w.dtype and (x.dtype == torch.bfloat16 or not torch.compiler.is_compiling())
        return dtype_ok and _aligned16(x) and _aligned16(w)  # the CPU kernel's layout rule
    return False


def _aligned16(t: torch.Tensor) -> bool:
    """Every non-unit stride a multiple of 16 bytes, and (in eager mode) the base pointer. A graph being
    compiled has no pointers; its buffers and the parameters are allocated 16-byte aligned."""
    size = t.element_size()
    if not all(s == 1 or (s * size) % 16 == 0 for s in t.stride()):
        return False
    return torch.compiler.is_compiling() or t.data_ptr() % 16 == 0


def grouped_mm(x_NK: torch.Tensor, w_EKM: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Per-group matmul: rows offs[e-1]:offs[e] of x times w[e]. x is [N, K], w is [E, K, M], result [N, M].

    Uses torch's grouped GEMM kernel where it applies, otherwise a loop over the groups (one host sync).
    """
    if _native_grouped_mm_ok(x_NK, w_EKM):
        return _NATIVE_GROUPED_MM(x_NK, w_EKM, offs=offs_E)
    ends = offs_E.tolist()
    starts = [0, *ends[:-1]]
    outs = [x_NK[s:e] @ w_EKM[i] for i, (s, e) in enumerate(zip(starts, ends, strict=True))]
    return torch.cat(outs) if outs else x_NK.new_zeros(0, w_EKM.shape[-1])


class RouterStats(NamedTuple):
    """What the balancing losses need from one MoE layer, per sequence, over real (unmasked) tokens only."""

    tokens_per_expert: torch.Tensor  # [B, E] float32: top-k assignments per expert
    prob_sum: torch.Tensor  # [B, E] float32: summed router probabilities per expert
    num_tokens: torch.Tensor  # [B] float32: real tokens routed
    z_sum: torch.Tensor  # [B] float32: summed logsumexp(router logits)^2


class Router(nn.Module):
    """Scores the experts of each token and picks its top-k: the routing rule of a family as configuration.

    - `scoring`: "softmax" over the experts, or an independent "sigmoid" per expert;
    - selection: the top-k of the scores plus `e_score_correction_bias` when the module has that buffer
      (aux-loss-free balancing: the bias only chooses, it never weights; see `update_router_bias`);
    - group-limited selection (DeepSeek) when `n_group` > 1: the experts are split into `n_group` equal groups,
      each scored by `group_rule` ("top2_sum": the sum of its two best selection scores, DeepSeek-V3; "max":
      its best score, DeepSeek-V2's group_limited_greedy), and a token picks its top-k among the experts of
      its best `topk_group` groups only;
    - weights: the selected scores, renormalised to sum to one when `norm_topk`, times `scale`.
    Logits, scores and weights are fp32 whatever the autocast.
    """

    def __init__(self, hidden: int, num_experts: int, top_k: int, scoring: str = "softmax", norm_topk: bool = True,
                 bias: bool = False, scale: float = 1.0, n_group: int = 1, topk_group: int | None = None,
                 group_rule: str = "top2_sum"):
        super().__init__()
        if scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"router scoring {scoring!r}: choose softmax or sigmoid")
        if group_rule not in GROUP_RULES:
            raise ValueError(f"router group_rule {group_rule!r}: choose one of {', '.join(GROUP_RULES)}")
        if n_group > 1 and (num_experts % n_group or not 0 < (topk_group or 0) <= n_group):
            raise ValueError(f"group-limited routing needs num_experts ({num_experts}) divisible by n_group "
                             f"({n_group}) and 0 < topk_group ({topk_group}) <= n_group")
        self.num_experts, self.top_k, self.scoring, self.norm_topk, self.scale = num_experts, top_k, scoring, norm_topk, scale
        self.n_group, self.topk_group, self.group_rule = n_group, topk_group, group_rule
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        if bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        """Module casts (`model.to(torch.bfloat16)`) move the selection bias but keep it fp32, as transformers
        keeps it: rounded to bf16, biases a few ulps apart would choose other experts."""
        bias = self._buffers.get("e_score_correction_bias")
        super()._apply(fn, recurse)
        moved = self._buffers.get("e_score_correction_bias")
        if bias is not None and bias.dtype == torch.float32 and moved is not None and moved.dtype != torch.float32:
            self._buffers["e_score_correction_bias"] = bias.to(moved.device)
        return self

    def forward(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [T, E], scores [T, E], weights [T, K], experts [T, K])."""
        with torch.autocast(x_TH.device.type, enabled=False):
            logits_TE = F.linear(x_TH.float(), self.weight.float())
        scores_TE = logits_TE.softmax(dim=-1) if self.scoring == "softmax" else logits_TE.sigmoid()
        bias = getattr(self, "e_score_correction_bias", None)
        if bias is None and self.n_group <= 1:
            weights_TK, experts_TK = scores_TE.topk(self.top_k, dim=-1)
        else:
            choice_TE = scores_TE if bias is None else scores_TE + bias
            if self.n_group > 1:
                choice_TE = self.limit_to_groups(choice_TE)
            experts_TK = choice_TE.topk(self.top_k, dim=-1).indices
            weights_TK = scores_TE.gather(1, experts_TK)
        if self.norm_topk:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        if self.scale != 1.0:
            weights_TK = weights_TK * self.scale
        return logits_TE, scores_TE, weights_TK, experts_TK


    def limit_to_groups(self, choice_TE: torch.Tensor) -> torch.Tensor:
        """The selection scores with every expert outside the token's best `topk_group` groups set to -inf."""
        T, E = choice_TE.shape
        grouped_TGS = choice_TE.view(T, self.n_group, E // self.n_group)
        if self.group_rule == "max":
            group_TG = grouped_TGS.max(dim=-1).values
        else:
            group_TG = grouped_TGS.topk(min(2, E // self.n_group), dim=-1).values.sum(dim=-1)
        best_TG = group_TG.topk(self.topk_group, dim=-1).indices
        keep_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, best_TG, True)
        return grouped_TGS.masked_fill(~keep_TG[..., None], float("-inf")).view(T, E)


class DenseMLP(nn.Module):
    """A SwiGLU feed-forward block (dense layers among MoE ones, and shared experts)."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """E SwiGLU experts as stacked weights, laid out like transformers 5 (`gate_up_proj`, `down_proj`)."""

    def __init__(self, num_experts: int, hidden: int, ffn: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * ffn, hidden))  # [E, 2F, H]: w1 then w3
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, ffn))  # [E, H, F]: w2
        self.fused = False  # the Triton SwiGLU between the two grouped GEMMs (MixtralForCausalLM.use_kernels)

    def forward(self, x_NH: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        """x_NH: routed rows sorted by expert; offs_E: end offset of each expert's rows."""
        return swiglu_experts(x_NH, self.gate_up_proj, self.down_proj, offs_E, self.fused)


def swiglu_experts(x_NH: torch.Tensor, gate_up_E2FH: torch.Tensor, down_EHF: torch.Tensor,
                   offs_E: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """The experts' SwiGLU over rows grouped by expert (also used on a rank's local experts under expert
    parallelism, see `moecpt.parallel.expert_parallel`). Under autocast the expert GEMMs run in the autocast
    dtype like any matmul (grouped GEMMs are not on autocast's list, so the cast is done here)."""
    dev = x_NH.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        x_NH, gate_up_E2FH, down_EHF = x_NH.to(dt), gate_up_E2FH.to(dt), down_EHF.to(dt)
    h_N2F = grouped_mm(x_NH, gate_up_E2FH.transpose(-2, -1), offs_E)
    return grouped_mm(swiglu(h_N2F, fused), down_EHF.transpose(-2, -1), offs_E)


class _GatherRows(torch.autograd.Function):
    """out = x[rows] (cast to `dtype` first if given), where each row of x is taken `k` times and `inverse`
    says where each copy went (out[inverse[i * k + j]] is the j-th copy of x[i]). Backward is then a gather
    and a sum over the k copies (in fp32 for low-precision copies) instead of autograd's scatter-add of
    indexing (a sort or atomics on a GPU, and nondeterministic order)."""

    @staticmethod
    def forward(ctx, x, rows, inverse, k: int, dtype: torch.dtype | None):
        ctx.save_for_backward(inverse)
        ctx.k, ctx.x_dtype = k, x.dtype
        return (x if dtype is None else x.to(dtype))[rows]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        g = grad[inverse]
        if ctx.k > 1:
            g = g.view(-1, ctx.k, g.shape[-1]).sum(1, dtype=torch.promote_types(g.dtype, ctx.x_dtype))
        return g.to(ctx.x_dtype), None, None, None, None


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """inv with inv[order[i]] = i, by a scatter (no second sort)."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def gather_rows(x: torch.Tensor, rows: torch.Tensor, inverse: torch.Tensor, k: int,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """x[rows] where every row of x appears exactly k times in `rows`, with a gather-only backward; `dtype`:
    the rows come out in this dtype (cast before the copy) and their gradient goes back in x's."""
    return _GatherRows.apply(x, rows, inverse, k, dtype)


class SparseMoeBlock(nn.Module):
    """Route each token to its top-k experts (`Router`), run all experts as one grouped GEMM over rows
    sorted by expert (dropless), mix the k outputs by the router weights; plus, optionally, a shared expert
    every token goes through, gated by sigmoid(shared_expert_gate(x)) (Qwen2-MoE)."""

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int, router: dict | None = None,
                 shared_ffn: int = 0, shared_gate: bool = False):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.gate = Router(hidden, num_experts, top_k, **(router or {}))
        self.experts = Experts(num_experts, hidden, ffn)
        if shared_ffn:
            self.shared_expert = DenseMLP(hidden, shared_ffn)
            if shared_gate:
                self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)

    def forward(self, x_BTH: torch.Tensor, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterStats]:
        """token_mask [B, T] (True = real token) only affects the statistics: every token is computed."""
        B, T, H = x_BTH.shape
        K = self.top_k
        x_TH = x_BTH.reshape(-1, H)
        logits_TE, scores_TE, weights_TK, experts_TK = self.gate(x_TH)

        # Permute: rows sorted by expert (stable, so tokens keep their order within an expert). inv_N[j] is
        # where routed row j (token j // K, its (j % K)-th expert) lands; both directions are gathers.
        flat_N = experts_TK.reshape(-1)
        order_N = flat_N.argsort(stable=True)
        inv_N = inverse_permutation(order_N)
        counts_E = torch.zeros(self.num_experts, dtype=torch.int32, device=x_TH.device)
        counts_E.scatter_add_(0, flat_N, torch.ones_like(flat_N, dtype=torch.int32))
        offs_E = counts_E.cumsum(0, dtype=torch.int32)
        # Under autocast the experts compute in the autocast dtype: cast the T rows before copying N = K * T.
        dev = x_TH.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        y_NH = self.experts(gather_rows(x_TH, order_N // K, inv_N, K, dtype), offs_E)

        # Unpermute (a gather by the inverse permutation) and mix the K expert outputs of each token.
        y_TKH = gather_rows(y_NH, inv_N, order_N, 1).view(-1, K, H)
        out_TH = torch.bmm(weights_TK.to(y_TKH.dtype).unsqueeze(1), y_TKH).squeeze(1)
        if hasattr(self, "shared_expert"):
            shared_TH = self.shared_expert(x_TH)
            if hasattr(self, "shared_expert_gate"):
                shared_TH = torch.sigmoid(self.shared_expert_gate(x_TH)) * shared_TH
            out_TH = out_TH + shared_TH
        return out_TH.view(B, T, H), self._stats(logits_TE, scores_TE, flat_N, token_mask, B)

    def _stats(self, logits_TE, scores_TE, flat_N, token_mask, B: int) -> RouterStats:
        E, K = self.num_experts, self.top_k
        # The balancing loss's probabilities: softmax scores as they are, sigmoid scores normalised per token.
        probs_TE = scores_TE if self.gate.scoring == "softmax" else scores_TE / scores_TE.sum(-1, keepdim=True)
        z_T = torch.logsumexp(logits_TE, dim=-1).square()
        T = logits_TE.shape[0]
        if token_mask is None:
            m_T = torch.ones(T, dtype=torch.float32, device=logits_TE.device)
        else:
            m_T = token_mask.reshape(-1).to(torch.float32)
        seq_N = torch.arange(T, device=logits_TE.device).repeat_interleave(K) // (T // B)
        tokens_BE = torch.zeros(B * E, dtype=torch.float32, device=logits_TE.device)
        tokens_BE.scatter_add_(0, seq_N * E + flat_N, m_T.repeat_interleave(K))
        return RouterStats(
            tokens_per_expert=tokens_BE.view(B, E),
            prob_sum=(probs_TE * m_T[:, None]).view(B, -1, E).sum(dim=1),
            num_tokens=m_T.view(B, -1).sum(dim=1),
            z_sum=(z_T * m_T).view(B, -1).sum(dim=1),
        )


@torch.no_grad()
def update_router_bias(model: nn.Module, counts_LE: torch.Tensor, rate: float) -> None:
    """Aux-loss-free balancing (DeepSeek-V3): after an optimizer step, move each MoE layer's selection bias
    toward the under-loaded experts, bias_e += rate * sign(mean load - load_e), with the step's global
    expert counts [MoE layers, E], in module order (a model's multi-token prediction layers, registered after
    its decoder layers, count only while they are trained). Not a gradient: the bias never enters the weights."""
    routers = [m.gate for m in model.modules() if isinstance(m, SparseMoeBlock)]
    if len(counts_LE) > len(routers):
        raise ValueError(f"expert counts of {len(counts_LE)} MoE layers for a model with {len(routers)}")
    for router, load_E in zip(routers, counts_LE, strict=False):
        bias = getattr(router, "e_score_correction_bias", None)
        if bias is not None:
            bias += rate * torch.sign(load_E.mean() - load_E).to(bias.dtype)
