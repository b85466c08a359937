"""DeepSeek-V3 (DeepSeek-V3/R1 671B; the design Kimi K2 and GLM-4.5 share): multi-head latent attention, dense
first layers, then MoE layers of sigmoid-scored, group-limited experts with shared experts, and multi-token
prediction layers.

Read from transformers' `models/deepseek_v3` (5.x):
- MLA: queries through a low-rank `q_a_proj` -> `q_a_layernorm` -> `q_b_proj` (or one `q_proj` when
  `q_lora_rank` is None); keys and values from one latent, `kv_a_proj_with_mqa` -> [kv_lora_rank | a shared
  rotary key of qk_rope_head_dim] -> `kv_a_layernorm` -> `kv_b_proj` -> per head [qk_nope | v_head_dim]. A head's
  query and key are [qk_nope | qk_rope]; RoPE (of qk_rope_head_dim) turns only the rope part, on interleaved
  pairs with `rope_interleave`. The softmax scale is qk_head_dim^-0.5, times mscale^2 with YaRN's
  `mscale_all_dim` (DeepSeek's correction; the cos/sin attention factor is then 1). The two latent norms take
  eps 1e-6 whatever `rms_norm_eps` is (transformers' rule). The KV cache holds the expanded keys and values.
- layers below `first_k_dense_replace` are dense SwiGLU MLPs of `intermediate_size`; the others MoE blocks:
  `n_routed_experts` of `moe_intermediate_size`, sigmoid scores, the top `num_experts_per_tok` chosen by score +
  `e_score_correction_bias` within the best `topk_group` of `n_group` groups (a group scored by the sum of its
  two best biased scores), weighted by the unbiased scores, renormalised with `norm_topk_prob`, times
  `routed_scaling_factor`; plus shared experts, one ungated SwiGLU of n_shared_experts x moe_intermediate_size.
- transformers computes no balancing loss for this family. moecpt continues it in the regime DeepSeek-V3 was
  pretrained with: aux-loss-free balancing (`router_bias_update_rate` 0.001 by default, the selection bias
  moved toward under-loaded experts each step) with the sequence-level balance loss an option
  (`router_aux_loss_coef` > 0, scope "sequence" by default; moecpt's loss is E x sum f P with f summing to
  top-k, so DeepSeek's sequence-wise alpha corresponds to router_aux_loss_coef = alpha / top-k: docs/models.md).
- multi-token prediction: `num_nextn_predict_layers` extra layers stored as `model.layers.{N + i}.*` (enorm,
  hnorm, eh_proj, a full MoE decoder layer, shared_head.norm, and copies of the embedding and the LM head,
  shared_head.head and embed_tokens). transformers ignores them; moecpt loads and exports them, and trains
  them with an extra loss when `mtp_loss_coef` > 0 (off by default: then they are kept unchanged, not run).
  A checkpoint saved by transformers has no MTP tensors whatever its config says: the layers are then not
  built (a log line says so).
- FP8 hub checkpoints (`quantization_config` fp8, `*.weight_scale_inv`) are dequantised on load
  (`moecpt.model.fp8`); export writes the dequantised weights and no quantization_config.

Hugging Face layouts read: the hub layout (`mlp.experts.{j}.gate_proj/up_proj/down_proj`, router `mlp.gate` with
its `e_score_correction_bias`, `mlp.shared_experts.*`) and the fused layout of transformers 5
(`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`). Saving writes the hub layout.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from moecpt.config import IGNORE_INDEX
from moecpt.errors import UserError
from moecpt.kernels.rope import apply_rope
from moecpt.model import fp8, hf
from moecpt.model.adapter import BIAS, StateDictAdapter
from moecpt.model.base import CausalLM
from moecpt.model.config import FamilyConfig
from moecpt.model.layers import DecoderLayer, KVCache, RMSNorm, sdpa_mask
from moecpt.model.moe import DenseMLP, RouterStats, SparseMoeBlock
from moecpt.model.rope import Yarn, rope_tables, yarn_factor, yarn_mscale

log = logging.getLogger(__name__)

LATENT_NORM_EPS = 1e-6  # transformers builds q_a_layernorm and kv_a_layernorm with its default eps
EXTRA_MOECPT_FIELDS = ("mtp_loss_coef",)


@dataclass(frozen=True)
class DeepseekV3Config(FamilyConfig):
    """The fields of transformers' DeepseekV3Config, with its defaults, plus moecpt's settings."""

    model_type: ClassVar[str] = "deepseek_v3"
    architecture: ClassVar[str] = "DeepseekV3ForCausalLM"
    hf_extras: ClassVar[dict[str, Any]] = {"attention_dropout": 0.0}
    group_rule: ClassVar[str] = "top2_sum"
    scoring: ClassVar[str] = "sigmoid"

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # the dense first layers
    moe_intermediate_size: int = 2048  # per routed expert (the shared experts: n_shared_experts x this)
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int = 128  # MLA: every head has its own key and value (must equal the heads)
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Yarn | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    num_nextn_predict_layers: int = 1  # the MTP layers (only those the checkpoint holds are built)
    # The hub checkpoints' fp8 quantisation (read to dequantise; never written back: export is unquantised).
    quantization_config: dict | None = field(default=None, hash=False)
    router_aux_loss_coef: float = 0.0  # the sequence-level balance loss, off (DeepSeek-V3: aux-loss-free)
    # moecpt's settings (never in config.json): DeepSeek-V3's pretraining regime (arXiv:2412.19437, 2.1.2:
    # bias update speed 0.001, a sequence-wise balance loss as a complement) and the MTP loss weight.
    router_bias_update_rate: float = 0.001
    router_balance_scope: str = "sequence"
    mtp_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", Yarn.from_hf(self.rope_scaling))
        self.raise_problems(self.problems())

    def problems(self) -> list[str]:
        problems = self.shape_problems((
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "n_routed_experts", "num_experts_per_tok", "kv_lora_rank", "qk_rope_head_dim",
            "v_head_dim", "n_group", "topk_group", "n_shared_experts", "max_position_embeddings"))
        if self.num_key_value_heads != self.num_attention_heads:
            problems.append(f"num_key_value_heads ({self.num_key_value_heads}) must equal num_attention_heads "
                            f"({self.num_attention_heads}): multi-head latent attention has a key per head")
        if self.qk_rope_head_dim % 2 or self.qk_nope_head_dim < 0:
            problems.append("qk_rope_head_dim must be even and qk_nope_head_dim >= 0")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            problems.append(f"q_lora_rank must be positive or null, got {self.q_lora_rank}")
        if not 0 <= self.first_k_dense_replace < self.num_hidden_layers:
            problems.append(f"first_k_dense_replace ({self.first_k_dense_replace}) must leave at least one MoE "
                            f"layer of {self.num_hidden_layers}")
        groups = self.n_group > 0 and self.topk_group > 0  # (else shape_problems reports them)
        if groups and (self.n_routed_experts % self.n_group or self.topk_group > self.n_group):
            problems.append(f"n_routed_experts ({self.n_routed_experts}) must split into n_group ({self.n_group}) "
                            f"equal groups, topk_group ({self.topk_group}) at most n_group")
        elif groups and self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
            problems.append(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts of the "
                            f"topk_group ({self.topk_group}) groups a token may use")
        if self.num_nextn_predict_layers < 0 or self.mtp_loss_coef < 0:
            problems.append("num_nextn_predict_layers and mtp_loss_coef must be >= 0")
        fp8.block_size(self.quantization_config)
        return problems

    # ---- what generic code reads ----------------------------------------------------------------------------
    @property
    def n_experts(self) -> int:
        return self.n_routed_experts

    @property
    def expert_ffn(self) -> int:
        return self.moe_intermediate_size

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def head_dim(self) -> int:
        """The rotary width, as transformers sets it (what the RoPE tables are built for)."""
        return self.qk_rope_head_dim

    @property
    def attn_head_dim(self) -> int:
        """The query/key width of a head (what the attention FLOPs count)."""
        return self.qk_head_dim

    @property
    def sparse_layers(self) -> list[int]:
        return list(range(self.first_k_dense_replace, self.num_hidden_layers))

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times DeepSeek's YaRN correction mscale(factor, mscale_all_dim)^2."""
        scale = self.qk_head_dim ** -0.5
        y = self.rope_scaling
        if y is not None and y.mscale_all_dim:
            m = yarn_mscale(yarn_factor(y, self.max_position_embeddings), y.mscale_all_dim)
            scale = scale * m * m
        return scale

    def router_options(self) -> dict[str, Any]:
        """The selection bias always exists (every DeepSeek-V3 checkpoint has it), trained or not."""
        return {"scoring": self.scoring, "norm_topk": self.norm_topk_prob, "bias": True,
                "scale": self.routed_scaling_factor, "n_group": self.n_group, "topk_group": self.topk_group,
                "group_rule": self.group_rule}

    # ---- config.json ------------------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json"):
        d = dict(d)
        for derived in ("head_dim", "qk_head_dim"):  # transformers writes them; both follow from the others
            d.pop(derived, None)
        if "num_nextn_predict_layers" not in d and "num_mtp_layers" in d:
            d["num_nextn_predict_layers"] = d["num_mtp_layers"]
        cls.refuse_other_variants(d, source)
        for key in ("n_group", "topk_group"):  # null in some configs: no group limit
            if d.get(key) is None:
                d[key] = 1
        kw = cls.hf_kwargs(d, source)
        kw["num_nextn_predict_layers"] = mtp_layers_present(kw.get("num_nextn_predict_layers", cls.num_nextn_predict_layers), d,
                                                          source)
        return cls(**kw)

    @classmethod
    def refuse_other_variants(cls, d: dict[str, Any], source: str) -> None:
        """Hub config keys transformers ignores but that would change the model: refused unless DeepSeek-V3's."""
        expected = {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1}
        for key, value in expected.items():
            if key in d and d[key] != value:
                raise UserError(f"{source}: {key}={d[key]!r} is not supported for {cls.model_type} (only {value!r})")

    def to_hf_dict(self, dtype: str = "float32") -> dict[str, Any]:
        """config.json for transformers (4.x and 5.x), without moecpt's settings and without the quantisation
        (export writes unquantised weights)."""
        d = super().to_hf_dict(dtype)
        for key in (*EXTRA_MOECPT_FIELDS, "quantization_config"):
            d.pop(key, None)
        return d


def mtp_layers_present(declared: int, d: dict[str, Any], source: str) -> int:
    """The MTP layers a checkpoint directory holds (config.json beside its safetensors): transformers saves
    none whatever `num_nextn_predict_layers` says. A config not read from a directory keeps what it declares."""
    path = Path(source)
    if not declared or path.name != "config.json" or not path.is_file():
        return declared
    try:
        names = hf.SafetensorsDir(path.parent).names()
    except UserError:
        return declared  # no weights beside it (a config alone): as declared
    n = int(d.get("num_hidden_layers", 0))
    present = sum(1 for i in range(declared) if any(k.startswith(f"model.layers.{n + i}.") for k in names))
    if present != declared:
        log.info("%s declares %d multi-token prediction layer(s) but the weights hold %d (transformers saves "
                    "none): building the model with %d", source, declared, present, present)
    elif present:
        log.warning("%s: %d multi-token prediction layer(s) loaded; %s", source, present,
                    "kept unchanged and exported (mtp_loss_coef = 0 does not train them)")
    return present


# ---- the model --------------------------------------------------------------------------------------------------
def rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved pairs (x0, x1), (x2, x3), ..., written de-interleaved ([rotated evens | rotated odds],
    transformers' `apply_rotary_pos_emb_interleave`; queries and keys alike, so the scores are unchanged)."""
    half = cos.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    xf = x.float()
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


class MLACache(KVCache):
    """Expanded keys [.., qk_head_dim] and values [.., v_head_dim] of every layer (MTP layers not included)."""

    def __init__(self, c: DeepseekV3Config, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        super().__init__(c.num_hidden_layers, c.num_attention_heads, c.qk_head_dim, batch, max_len, dtype, device)
        shape = (batch, c.num_attention_heads, max_len, c.v_head_dim)
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.num_hidden_layers)]


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3), through SDPA with the family's softmax scale."""

    window = None  # full causal attention (read by CausalLM.trunk)

    def __init__(self, c: DeepseekV3Config, layer: int):
        super().__init__()
        self.layer, self.c = layer, c
        H, heads = c.hidden_size, c.num_attention_heads
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(H, heads * c.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(H, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(c.q_lora_rank, heads * c.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, c.kv_lora_rank + c.qk_rope_head_dim, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, heads * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = nn.Linear(heads * c.v_head_dim, H, bias=c.attention_bias)
        self.scale = c.softmax_scale
        self.fused_rope = False

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.c.rope_interleave:
            return rotate_interleaved(x, cos, sin)
        return apply_rope(x, cos, sin, self.fused_rope)

    def forward(self, x_BTH, cos, sin, mask, cache: KVCache | None = None) -> torch.Tensor:
        c = self.c
        B, T, _ = x_BTH.shape
        nope, rope, heads = c.qk_nope_head_dim, c.qk_rope_head_dim, c.num_attention_heads
        q = self.q_proj(x_BTH) if c.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTH)))
        q = q.view(B, T, heads, c.qk_head_dim)
        latent, k_rot = self.kv_a_proj_with_mqa(x_BTH).split([c.kv_lora_rank, rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(B, T, heads, nope + c.v_head_dim)
        k_nope, v = kv.split([nope, c.v_head_dim], dim=-1)
        k_rot = self.rotate(k_rot.view(B, T, 1, rope), cos, sin).expand(B, T, heads, rope)
        q = torch.cat([q[..., :nope], self.rotate(q[..., nope:], cos, sin)], dim=-1).transpose(1, 2)
        k = torch.cat([k_nope, k_rot], dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, heads * c.v_head_dim))


def deepseek_layer(c: DeepseekV3Config, i: int, sparse: bool) -> DecoderLayer:
    attention = MLAttention(c, i)
    if not sparse:
        return DecoderLayer(c.hidden_size, c.rms_norm_eps, attention, DenseMLP(c.hidden_size, c.intermediate_size),
                            sparse=False)
    moe = SparseMoeBlock(c.hidden_size, c.moe_intermediate_size, c.n_routed_experts, c.num_experts_per_tok,
                         c.router_options(), shared_ffn=c.n_shared_experts * c.moe_intermediate_size)
    return DecoderLayer(c.hidden_size, c.rms_norm_eps, attention, moe, sparse=True)


class MTPLayer(nn.Module):
    """One multi-token prediction depth: eh_proj([enorm(embedding of the token k ahead) | hnorm(previous
    depth's hidden state)]) through a MoE decoder layer, then its own final norm before the shared LM head."""

    def __init__(self, c: DeepseekV3Config, depth: int):
        super().__init__()
        H = c.hidden_size
        self.enorm = RMSNorm(H, c.rms_norm_eps)
        self.hnorm = RMSNorm(H, c.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.block = deepseek_layer(c, c.num_hidden_layers + depth, sparse=True)
        self.head_norm = RMSNorm(H, c.rms_norm_eps)

    def forward(self, emb, h, cos, sin, mask, token_mask) -> tuple[torch.Tensor, RouterStats]:
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        x, stats = self.block(x, cos, sin, mask, token_mask)
        return self.head_norm(x), stats


class DeepseekV3ForCausalLM(CausalLM):
    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        layers = [deepseek_layer(config, i, i >= config.first_k_dense_replace) for i in range(config.num_hidden_layers)]
        self.setup(config, layers)
        if config.num_nextn_predict_layers:
            self.mtp = nn.ModuleList(MTPLayer(config, d) for d in range(config.num_nextn_predict_layers))

    def rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        return rope_tables(position_ids, c.qk_rope_head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        return MLACache(self.config, batch, max_len, dtype, device)

    def mtp_loss(self, h, input_ids, targets, attention_mask, position_ids, intra_doc_attention, token_mask):
        """Depth k predicts the token k + 1 ahead of each position from the previous depth's hidden state and
        the embedding of the token k ahead: the summed cross-entropy, averaged over depths (None when MTP is
        off or absent), and the MTP layers' router statistics."""
        if not self.config.mtp_loss_coef or not hasattr(self, "mtp"):
            return None, []
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = self.rope(position_ids)
        mask = sdpa_mask(input_ids, attention_mask, position_ids, intra_doc_attention, 0, None)
        total, stats = h.new_zeros((), dtype=torch.float32), []
        for k, layer in enumerate(self.mtp, start=1):
            ids_k = F.pad(input_ids[:, k:], (0, k), value=0)
            targets_k = F.pad(targets[:, k:], (0, k), value=IGNORE_INDEX)
            h, s = layer(self.embed_tokens(ids_k), h, cos, sin, mask, token_mask)
            stats.append(s)
            total = total + self.loss_fn.token_losses(h, self.lm_head.weight, targets_k).sum()
        return total / len(self.mtp), stats


# ---- Hugging Face names -----------------------------------------------------------------------------------------
class DeepseekV3Adapter(StateDictAdapter):
    """The hub layout's router is `mlp.gate` with its `e_score_correction_bias`; the shared experts are
    `mlp.shared_experts`; MTP depth d is `model.layers.{N + d}`; fp8 weights carry `weight_scale_inv`."""

    model_cls = DeepseekV3ForCausalLM
    bias_in_hf = True
    MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")  # each depth's copies of the shared tensors

    def hf_name(self, name: str, layout: str) -> str:
        name = name.replace(".moe.shared_expert.", ".moe.shared_experts.")
        m = re.match(r"mtp\.(\d+)\.(.*)", name)
        if m:
            layer = f"layers.{self.config.num_hidden_layers + int(m.group(1))}."
            rest = m.group(2).replace("block.", "", 1).replace("head_norm.", "shared_head.norm.", 1)
            name = layer + rest
        return super().hf_name(name, layout)

    def hub_experts(self, name: str, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], Callable]]:
        return super().hub_experts(self.hf_name(name, "hub")[len("model."):].replace(".mlp.", ".moe."), shape)

    def mtp_copies(self) -> dict[str, str]:
        """Each MTP depth's copy of the embedding / LM head (hub name) -> the moecpt tensor it equals."""
        c, out = self.config, {}
        head = "embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
        for d in range(c.num_nextn_predict_layers):
            prefix = f"model.layers.{c.num_hidden_layers + d}."
            out[prefix + "embed_tokens.weight"] = "embed_tokens.weight"
            out[prefix + "shared_head.head.weight"] = head
        return out

    def hf_shapes(self, layout: str) -> dict[str, tuple[int, ...]]:
        out = super().hf_shapes(layout)
        if layout == "fused":  # the fused experts of an MTP depth are named like its other tensors
            out = {self.fused_mtp(n): s for n, s in out.items()}
        shapes = self.state_shapes()
        return out | {n: shapes[src] for n, src in self.mtp_copies().items()}

    def fused_mtp(self, hf_name: str) -> str:
        m = re.match(r"model\.mtp\.(\d+)\.block\.(.*)", hf_name)
        return hf_name if not m else f"model.layers.{self.config.num_hidden_layers + int(m.group(1))}.{m.group(2)}"

    def optional_hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """Besides the defaults: the fp8 scales of a quantised checkpoint's matrices."""
        out = super().optional_hf_shapes()
        block = fp8.block_size(self.config.quantization_config)
        if block is not None:
            for name, shape in self.hf_shapes("hub").items():
                if quantisable(name, shape):
                    out[name.removesuffix(".weight") + ".weight_scale_inv"] = fp8.scale_shape(shape, block)
        return out

    def hf_tensor(self, name: str, get: Callable[[str], torch.Tensor], layout: str) -> torch.Tensor:
        block = fp8.block_size(self.config.quantization_config)
        if ".experts." in name and layout == "fused":
            return self.read(get, self.fused_mtp("model." + name.replace(".moe.", ".mlp.")), block)
        t = super().hf_tensor(name, lambda n: self.read(get, n, block), layout)
        self.check_copies(name, t, lambda n: self.read(get, n, block))
        return t

    def hf_region(self, name: str, get: Callable[[str], torch.Tensor],
                  get_slice: Callable[[str, tuple[slice, ...]], torch.Tensor], layout: str,
                  region: tuple[slice, ...]) -> torch.Tensor:
        """A sharded load's part of a tensor, reading only that part of the files: of an fp8 weight, the
        scale blocks that cover it too; of hub-layout experts, only the experts in `region`. (Reading whole
        tensors would have every rank read and dequantise every expert: 30 GB in fp32 per DeepSeek-V3 layer.)"""
        block = fp8.block_size(self.config.quantization_config)

        def read(hf_name: str, part: tuple[slice, ...]) -> torch.Tensor:
            return self.read_part(get_slice, hf_name, part, block)

        shape = self.state_shapes()[name]
        if name.endswith(BIAS) and not self.bias_in_hf:
            return torch.zeros(shape, dtype=torch.float32)[region]
        if ".experts." not in name:
            t = read(self.hf_name(name, layout), region)
            self.check_copies(name, t, lambda n: read(n, region))
            return t
        if layout == "fused":
            return read(self.fused_mtp("model." + name.replace(".moe.", ".mlp.")), region)
        parts, experts, rest = list(self.hub_experts(name, shape)), region[0], region[1:]
        if not name.endswith("gate_up_proj"):
            return torch.stack([read(parts[j], rest) for j in range(experts.start, experts.stop)])
        F, rows = shape[1] // 2, rest[0]
        halves = [(0, slice(min(rows.start, F), min(rows.stop, F))),  # rows of the gate half, then the up half
                  (1, slice(max(rows.start, F) - F, max(rows.stop, F) - F))]
        return torch.stack([torch.cat([read(parts[2 * j + k], (r, *rest[1:])) for k, r in halves if r.stop > r.start])
                            for j in range(experts.start, experts.stop)])

    def check_copies(self, name: str, t: torch.Tensor, read: Callable[[str], torch.Tensor]) -> None:
        """Warn where an MTP depth's copy of the embedding / LM head (as `read` gives it) differs from `t`."""
        for copy in [n for n, src in self.mtp_copies().items() if src == name]:
            if not torch.equal(read(copy), t):
                log.warning("%s differs from %s, which moecpt shares with it: the MTP layer will use (and export) "
                            "%s", copy, name, name)

    @staticmethod
    def read(get: Callable[[str], torch.Tensor], hf_name: str, block: tuple[int, int] | None) -> torch.Tensor:
        """A Hugging Face tensor, dequantised (fp32) when the checkpoint stores it in fp8."""
        t = get(hf_name)
        if not fp8.is_fp8(t):
            return t
        return fp8.dequantize(t, fp8_scale(get, hf_name, t, block), block, torch.float32, hf_name)

    @staticmethod
    def read_part(get_slice: Callable[[str, tuple[slice, ...]], torch.Tensor], hf_name: str,
                  region: tuple[slice, ...], block: tuple[int, int] | None) -> torch.Tensor:
        """`region` (one slice per dim, explicit bounds) of a Hugging Face tensor, dequantised (fp32) with only
        the scales that cover it when the checkpoint stores it in fp8."""
        t = get_slice(hf_name, region)
        if not fp8.is_fp8(t):
            return t
        blocks = (*region[:-2], *fp8.scale_region(region[-2:], block or fp8.DEFAULT_BLOCK))
        scale = fp8_scale(lambda n: get_slice(n, blocks), hf_name, t, block)
        return fp8.dequantize_part(t, scale, block, (region[-2].start, region[-1].start))


    def to_hf(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = super().to_hf(state)
        return out | {n: state[src] for n, src in self.mtp_copies().items()}


def fp8_scale(get: Callable[[str], torch.Tensor], hf_name: str, t: torch.Tensor,
              block: tuple[int, int] | None) -> torch.Tensor:
    """The `weight_scale_inv` of an fp8 tensor (read with `get`), or an error naming what is missing."""
    scale_name = hf_name.removesuffix(".weight") + ".weight_scale_inv"
    if block is None:
        raise UserError(f"{hf_name} is stored in {t.dtype} but config.json has no quantization_config (fp8, "
                        "weight_block_size) to dequantise it with")
    try:
        return get(scale_name)
    except KeyError:
        raise UserError(f"{hf_name} is stored in {t.dtype} but the checkpoint has no {scale_name}") from None


def quantisable(hf_name: str, shape: tuple[int, ...]) -> bool:
    """The matrices a DeepSeek fp8 checkpoint may store in fp8: every projection but the router, the embeddings
    and the LM head (and their MTP copies)."""
    return (len(shape) == 2 and hf_name.endswith(".weight") and not hf_name.endswith(("norm.weight", "mlp.gate.weight"))
            and not hf_name.endswith(("embed_tokens.weight", "lm_head.weight", "shared_head.head.weight")))


DeepseekV3ForCausalLM.adapter_cls = DeepseekV3Adapter


PRESETS: dict[str, DeepseekV3Config] = {
    # deepseek-ai/DeepSeek-V3's config.json (671B parameters, 37B active; fp8 weights in 128 x 128 blocks;
    # YaRN to 160K from a 4K pretraining context, mscale = mscale_all_dim = 1; one MTP layer).
    "deepseek-v3-671b": DeepseekV3Config(
        max_position_embeddings=163840,
        rope_scaling=Yarn(factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                          mscale=1.0, mscale_all_dim=1.0),
        quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                             "weight_block_size": [128, 128]},
    ),
    # For tests: every feature at a few hundred thousand parameters besides the embeddings (a dense first
    # layer, q low-rank, 2 of 4 groups, a shared expert, one MTP layer, the real vocabulary).
    "deepseek-v3-tiny": DeepseekV3Config(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
        topk_group=2, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=2048, num_nextn_predict_layers=0,
    ),
}
DeepseekV3Config.presets = PRESETS
