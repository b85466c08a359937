"""gpt-oss (openai/gpt-oss-20b, -120b): GQA attention with biases on all four projections, a learned sink
logit per head in each softmax (`Attention(sinks=True)`), layers alternating between a 128-position sliding
window and full attention (`layer_types`), YaRN RoPE; every layer a MoE block whose router is a linear with a
bias (top-k of the logits, then a softmax over the k), and experts with biases and a clamped SwiGLU:

    gate = min(gate, limit); up = clamp(up, -limit, limit); out = (up + 1) * gate * sigmoid(alpha * gate)

Read from transformers' `models/gpt_oss` (5.x):
- `layer_types` defaults to sliding for even layer indices, full for odd ones; without `rope_parameters`
  transformers uses YaRN (factor 32 over 4,096 positions, beta 32 / 1, not truncated) at theta 150,000;
- the expert tensors are stored as transformers holds them: `mlp.experts.gate_up_proj` [E, H, 2F] with gate
  and up INTERLEAVED in the columns (gate even, up odd), `gate_up_proj_bias` [E, 2F] likewise,
  `down_proj` [E, F, H], `down_proj_bias` [E, H]; the router is `mlp.router.weight` / `.bias`. The published
  checkpoints use the same names (transformers 5 has no conversion for this family), with the two expert
  matrices MXFP4-packed (`*_blocks`, `*_scales`; config.json `quantization_config.quant_method` "mxfp4").
  moecpt holds the experts like every family ([E, 2F, H]: gate rows then up rows; [E, H, F]).

Loading reads either layout ("bf16": plain tensors; "mxfp4": dequantised on load by `moecpt.model.mxfp4`,
bit-identical to transformers). Saving always writes plain (unquantised) tensors in the dtype asked for (bf16
or fp32) and no `quantization_config`: an export of a model loaded from MXFP4 is about 4x larger than its
source, and a warning says so when such a checkpoint is read.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from moecpt.errors import UserError
from moecpt.model.adapter import BIAS, StateDictAdapter
from moecpt.model.base import CausalLM
from moecpt.model.config import FamilyConfig, LayerTypes
from moecpt.model.layers import Attention, DecoderLayer
from moecpt.model.moe import Experts, Router, SparseMoeBlock, grouped_mm
from moecpt.model.mxfp4 import BLOCK, dequantize_mxfp4
from moecpt.model.rope import Yarn, rope_tables

# transformers' GptOssConfig default when config.json has no rope parameters.
DEFAULT_YARN = Yarn(factor=32.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0, truncate=False)
DEFAULT_THETA = 150000.0


@dataclass(frozen=True)
class GptOssConfig(LayerTypes, FamilyConfig):
    """The fields of transformers' GptOssConfig, with its defaults (its `num_local_experts` spelling)."""

    model_type: ClassVar[str] = "gpt_oss"
    architecture: ClassVar[str] = "GptOssForCausalLM"
    hf_extras: ClassVar[dict[str, Any]] = {"attention_dropout": 0.0}

    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880  # per expert
    num_hidden_layers: int = 36
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    num_local_experts: int = 128
    num_experts_per_tok: int = 4
    sliding_window: int | None = 128  # on the "sliding_attention" layers
    layer_types: tuple[str, ...] | None = None  # None: sliding for even layer indices, full for odd ones
    attention_bias: bool = True
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    max_position_embeddings: int = 131072
    rope_theta: float = DEFAULT_THETA
    rope_scaling: Yarn | None = DEFAULT_YARN
    rms_norm_eps: float = 1e-5
    router_aux_loss_coef: float = 0.001
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        problems = self.shape_problems((
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "num_local_experts", "num_experts_per_tok", "max_position_embeddings"))
        if not (self.swiglu_limit > 0 and self.swiglu_alpha > 0):
            problems.append(f"swiglu_limit ({self.swiglu_limit}) and swiglu_alpha ({self.swiglu_alpha}) must be "
                            "positive")
        self.raise_problems(problems + self._window_problems())

    def _window_problems(self) -> list[str]:
        problems = self.layer_type_problems()
        if "sliding_attention" in self.attention_types and not (self.sliding_window or 0) > 0:
            problems.append(f"sliding_attention layers need a positive sliding_window, got {self.sliding_window}")
        return problems

    @property
    def attention_types(self) -> tuple[str, ...]:
        """Each layer's attention: `layer_types`, or transformers' default (even layers slide)."""
        if self.layer_types is not None:
            return self.layer_types
        return tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(self.num_hidden_layers))

    @property
    def n_experts(self) -> int:
        return self.num_local_experts

    @property
    def expert_ffn(self) -> int:
        return self.intermediate_size

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> GptOssConfig:
        """Also transformers' defaults where config.json leaves them out: YaRN and theta 150,000. A quantisation
        other than MXFP4 (the published one) is refused."""
        d = dict(d)
        method = (d.get("quantization_config") or {}).get("quant_method")
        if method not in (None, "mxfp4"):
            raise UserError(f"{source}: quantization_config.quant_method {method!r} is not supported for gpt_oss "
                            "(moecpt reads OpenAI's MXFP4 expert weights or unquantised ones; dequantise others "
                            "with their own tools first)")
        d.setdefault("rope_theta", DEFAULT_THETA)
        if not d.get("rope_parameters") and not d.get("rope_scaling"):
            d["rope_parameters"] = DEFAULT_YARN.to_hf() | {"rope_theta": d["rope_theta"]}
        if d.get("num_experts") is not None and "num_local_experts" not in d:
            d["num_local_experts"] = d["num_experts"]
        return cls(**cls.hf_kwargs(d, source))

    def to_hf_dict(self, dtype: str = "float32") -> dict[str, Any]:
        """config.json with every layer's attention type spelled out and no quantization_config (moecpt
        writes unquantised weights)."""
        d = super().to_hf_dict(dtype)
        d["layer_types"] = list(self.attention_types)
        return d


# ---- the MoE block --------------------------------------------------------------------------------------
class GptOssRouter(Router):
    """logits = x W^T + b (fp32); the top-k logits (plus the aux-loss-free selection bias, when on) choose,
    and a softmax over the k chosen logits weights. The scores the balancing loss sees are the softmax over
    all experts, as transformers' load-balancing loss computes them."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, selection_bias: bool = False):
        super().__init__(hidden, num_experts, top_k)
        self.bias = nn.Parameter(torch.empty(num_experts))
        if selection_bias:
            self.register_buffer(BIAS, torch.zeros(num_experts, dtype=torch.float32))

    def forward(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.autocast(x_TH.device.type, enabled=False):
            logits_TE = F.linear(x_TH.float(), self.weight.float(), self.bias.float())
        bias = getattr(self, BIAS, None)
        experts_TK = (logits_TE if bias is None else logits_TE + bias).topk(self.top_k, dim=-1).indices
        weights_TK = logits_TE.gather(1, experts_TK).softmax(dim=-1)
        return logits_TE, logits_TE.softmax(dim=-1), weights_TK, experts_TK


class GptOssExperts(Experts):
    """E experts with biases and the clamped SwiGLU, stacked like `Experts` ([E, 2F, H] gate rows then up
    rows, [E, H, F]) plus `gate_up_proj_bias` [E, 2F] (gate then up) and `down_proj_bias` [E, H]."""

    def __init__(self, num_experts: int, hidden: int, ffn: int, alpha: float, limit: float):
        super().__init__(num_experts, hidden, ffn)
        self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, 2 * ffn))
        self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden))
        self.alpha, self.limit = alpha, limit

    def forward(self, x_NH: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        return self.grouped(x_NH, offs_E, self.gate_up_proj, self.down_proj, self.gate_up_proj_bias,
                            self.down_proj_bias)

    def grouped(self, x_NH: torch.Tensor, offs_E: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                gate_up_proj_bias: torch.Tensor, down_proj_bias: torch.Tensor) -> torch.Tensor:
        """The experts over rows grouped by expert, with these (possibly rank-local) tensors: the hook expert
        parallelism calls with a rank's own experts (`moecpt.parallel.expert_parallel`)."""
        return clamped_swiglu_experts(x_NH, gate_up_proj, down_proj, gate_up_proj_bias, down_proj_bias, offs_E,
                                      self.alpha, self.limit)


class _RowBias(torch.autograd.Function):
    """bias_E[expert of each row] for rows grouped by expert (counts_E rows each); the backward sums each
    expert's rows with a segment reduction (deterministic, unlike the scatter-add of indexing)."""

    @staticmethod
    def forward(ctx, bias_EC: torch.Tensor, counts_E: torch.Tensor, rows: int) -> torch.Tensor:
        ctx.save_for_backward(counts_E)
        return bias_EC.repeat_interleave(counts_E, dim=0, output_size=rows)

    @staticmethod
    def backward(ctx, grad_NC: torch.Tensor):
        (counts_E,) = ctx.saved_tensors
        return torch.segment_reduce(grad_NC, "sum", lengths=counts_E, axis=0, unsafe=True, initial=0), None, None


def clamped_swiglu(h_N2F: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's activation of [gate | up] halves, as transformers computes it (gate clamped from above only,
    up on both sides, and the up path shifted by one)."""
    gate, up = h_N2F.chunk(2, dim=-1)
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def clamped_swiglu_experts(x_NH: torch.Tensor, gate_up_E2FH: torch.Tensor, down_EHF: torch.Tensor,
                           gate_up_bias_E2F: torch.Tensor, down_bias_EH: torch.Tensor, offs_E: torch.Tensor,
                           alpha: float, limit: float) -> torch.Tensor:
    """Two grouped GEMMs over rows sorted by expert, each row plus its expert's bias, the clamped SwiGLU
    between them. Under autocast the GEMMs and biases run in the autocast dtype."""
    dev = x_NH.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        x_NH, gate_up_E2FH, down_EHF = x_NH.to(dt), gate_up_E2FH.to(dt), down_EHF.to(dt)
        gate_up_bias_E2F, down_bias_EH = gate_up_bias_E2F.to(dt), down_bias_EH.to(dt)
    counts_E = torch.diff(offs_E.long(), prepend=offs_E.new_zeros(1).long())
    N = x_NH.shape[0]
    h_N2F = grouped_mm(x_NH, gate_up_E2FH.transpose(-2, -1), offs_E) + _RowBias.apply(gate_up_bias_E2F, counts_E, N)
    a_NF = clamped_swiglu(h_N2F, alpha, limit)
    return grouped_mm(a_NF, down_EHF.transpose(-2, -1), offs_E) + _RowBias.apply(down_bias_EH, counts_E, N)


class GptOssMoe(SparseMoeBlock):
    """`SparseMoeBlock` (routing, permutation, statistics) with gpt-oss's router and experts."""

    def __init__(self, c: GptOssConfig):
        super().__init__(c.hidden_size, c.intermediate_size, c.num_local_experts, c.num_experts_per_tok)
        self.gate = GptOssRouter(c.hidden_size, c.num_local_experts, c.num_experts_per_tok,
                                 selection_bias=c.router_bias_update_rate > 0)
        self.experts = GptOssExperts(c.num_local_experts, c.hidden_size, c.intermediate_size, c.swiglu_alpha,
                                     c.swiglu_limit)


# ---- the model ------------------------------------------------------------------------------------------
def gpt_oss_layer(c: GptOssConfig, i: int) -> DecoderLayer:
    attention = Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, i,
                          qkv_bias=c.attention_bias, o_bias=c.attention_bias, window=c.window(i), sinks=True)
    return DecoderLayer(c.hidden_size, c.rms_norm_eps, attention, GptOssMoe(c), sparse=True)


class GptOssForCausalLM(CausalLM):
    def __init__(self, config: GptOssConfig):
        super().__init__()
        self.setup(config, [gpt_oss_layer(config, i) for i in range(config.num_hidden_layers)])

    def rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        return rope_tables(position_ids, c.head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings)

    def init_rule(self, name: str) -> str:
        """transformers' rule: the router's bias and the sinks are drawn like the matrices; every other
        bias starts at zero."""
        return "normal" if name.endswith("moe.gate.bias") else super().init_rule(name)


# ---- Hugging Face names ---------------------------------------------------------------------------------
EXPERT_TENSORS = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
QUANTISED = ("gate_up_proj", "down_proj")


def interleaved_to_halves(t: torch.Tensor) -> torch.Tensor:
    """[..., 2F] with gate and up interleaved (even, odd) -> [..., 2F] gate half then up half."""
    return torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1)


def halves_to_interleaved(t: torch.Tensor) -> torch.Tensor:
    """[..., 2F] gate half then up half -> gate and up interleaved (even, odd)."""
    gate, up = t.chunk(2, dim=-1)
    return torch.stack([gate, up], dim=-1).flatten(-2)


class GptOssAdapter(StateDictAdapter):
    """Layouts: "bf16" (plain tensors, whatever their dtype) and "mxfp4" (packed expert matrices)."""

    model_cls = GptOssForCausalLM

    def hf_name(self, name: str, layout: str) -> str:
        if name == "lm_head.weight":
            return name
        return "model." + name.replace(".moe.gate.", ".mlp.router.").replace(".moe.", ".mlp.")

    def detect_layout(self, names: set[str]) -> str:
        packed = {n for n in names if n.endswith(("_blocks", "_scales"))}
        if not packed:
            return "bf16"
        plain = {n for n in names if n.endswith((".experts.gate_up_proj", ".experts.down_proj"))}
        if plain:
            raise UserError(f"checkpoint mixes MXFP4 expert tensors ({min(packed)}) and unquantised ones "
                            f"({min(plain)}); re-save it with one layout")
        warnings.warn("gpt-oss: MXFP4 expert weights are dequantised on load; save_pretrained and exports write "
                      "them unquantised (bf16 or fp32, no quantization_config), about 4x larger than the source",
                      stacklevel=2)
        return "mxfp4"

    def hf_shapes(self, layout: str) -> dict[str, tuple[int, ...]]:
        c, out = self.config, {}
        E, H, F = c.num_local_experts, c.hidden_size, c.intermediate_size
        hf_expert = {"gate_up_proj": (E, H, 2 * F), "gate_up_proj_bias": (E, 2 * F), "down_proj": (E, F, H),
                     "down_proj_bias": (E, H)}
        for name, shape in self.state_shapes().items():
            if name.endswith(BIAS):
                continue
            if ".experts." not in name:
                out[self.hf_name(name, layout)] = shape
                continue
            base, kind = self.hf_name(name, layout), name.rsplit(".", 1)[1]
            if layout == "mxfp4" and kind in QUANTISED:
                rows, cols = (2 * F, H) if kind == "gate_up_proj" else (H, F)
                if cols % BLOCK:
                    raise UserError(f"{base}: MXFP4 packs {BLOCK} values per block; {cols} is not a multiple")
                out[base + "_blocks"] = (E, rows, cols // BLOCK, BLOCK // 2)
                out[base + "_scales"] = (E, rows, cols // BLOCK)
            else:
                out[base] = hf_expert[kind]
        return out

    def hf_tensor(self, name: str, get: Callable[[str], torch.Tensor], layout: str) -> torch.Tensor:
        """Experts: de-interleaved and transposed to moecpt's stacking; MXFP4 ones dequantised first (fp32,
        exact: every MXFP4 value is a small integer times a power of two)."""
        if ".experts." not in name:
            return super().hf_tensor(name, get, layout)
        base, kind = self.hf_name(name, layout), name.rsplit(".", 1)[1]
        if layout == "mxfp4" and kind in QUANTISED:
            t = dequantize_mxfp4(get(base + "_blocks"), get(base + "_scales"), torch.float32)
        else:
            t = get(base)
        if kind == "gate_up_proj":
            return interleaved_to_halves(t).transpose(1, 2).contiguous()  # [E, H, 2F] -> [E, 2F, H]
        if kind == "gate_up_proj_bias":
            return interleaved_to_halves(t)
        if kind == "down_proj":
            return t.transpose(1, 2).contiguous()  # [E, F, H] -> [E, H, F]
        return t

    def hf_region(self, name: str, get: Callable[[str], torch.Tensor],
                  get_slice: Callable[[str, tuple[slice, ...]], torch.Tensor], layout: str,
                  region: tuple[slice, ...]) -> torch.Tensor:
        """A sharded load's part of a tensor: of the experts, only those in `region` are read (and
        dequantised), then converted as `hf_tensor` does; every other tensor is a plain rename, read sliced.
        (Reading whole tensors would have every rank dequantise every expert: 8.5 GB in fp32 per gpt-oss-120b
        gate_up_proj.)"""
        if name.endswith(BIAS):
            return torch.zeros(self.state_shapes()[name], dtype=torch.float32)[region]
        if ".experts." not in name:
            return get_slice(self.hf_name(name, layout), region)
        experts = self.hf_tensor(name, lambda n: get_slice(n, region[:1]), layout)
        return experts[(slice(None), *region[1:])]

    def to_hf_tensor(self, name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """One moecpt tensor in the plain layout: experts interleaved and transposed back to transformers'
        stacking. A selection bias (no place in the format) is dropped, with a warning when it holds anything."""
        if name.endswith(BIAS):
            return super().to_hf_tensor(name, t)  # dropped, with the base adapter's warning
        kind = name.rsplit(".", 1)[1] if ".experts." in name else None
        if kind == "gate_up_proj":
            t = halves_to_interleaved(t.transpose(1, 2))
        elif kind == "gate_up_proj_bias":
            t = halves_to_interleaved(t)
        elif kind == "down_proj":
            t = t.transpose(1, 2)
        return {self.hf_name(name, "bf16"): t}


GptOssForCausalLM.adapter_cls = GptOssAdapter


PRESETS: dict[str, GptOssConfig] = {
    # openai/gpt-oss-20b's config.json (21B parameters, 3.6B active; 24 layers, 32 experts, top-4). Its
    # router_aux_loss_coef 0.9 is the published config value; OpenAI has not published the balancing
    # regime or scope gpt-oss was trained with (micro-batch, transformers' rule, is a guess).
    "gpt-oss-20b": GptOssConfig(
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64,
        num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
        max_position_embeddings=131072, rope_theta=150000.0, rope_scaling=DEFAULT_YARN, rms_norm_eps=1e-5,
        router_aux_loss_coef=0.9, eos_token_id=200002, pad_token_id=199999, tie_word_embeddings=False,
    ),
    # openai/gpt-oss-120b's config.json (117B parameters, 5.1B active; 36 layers, 128 experts, top-4).
    "gpt-oss-120b": GptOssConfig(
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=36, num_attention_heads=64,
        num_key_value_heads=8, head_dim=64, num_local_experts=128, num_experts_per_tok=4, sliding_window=128,
        max_position_embeddings=131072, rope_theta=150000.0, rope_scaling=DEFAULT_YARN, rms_norm_eps=1e-5,
        router_aux_loss_coef=0.9, eos_token_id=200002, pad_token_id=199999, tie_word_embeddings=False,
    ),
    # For tests: every feature of the family (sinks, alternating 8-position windows, YaRN, biases, the clamped
    # SwiGLU) at a few hundred thousand parameters besides the embeddings, on the tiny training vocabulary.
    "gpt-oss-tiny": GptOssConfig(
        vocab_size=32000, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2, sliding_window=8,
        max_position_embeddings=2048, rope_scaling=Yarn(factor=4.0, original_max_position_embeddings=512,
                                                        truncate=False),
        eos_token_id=2, pad_token_id=0,
    ),
}
GptOssConfig.presets = PRESETS
