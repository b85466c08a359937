"""Dense-to-MoE upcycling: a dense Hugging Face Llama, Mistral or Qwen3 as a Mixtral or Qwen3-MoE directory that
computes the same function at initialisation (arXiv 2410.07524, "Upcycling Large Language Models into Mixture
of Experts").

Attention, norms, embeddings and the LM head are copied. Each MoE block's experts come from the layer's dense
SwiGLU MLP (gate, up, down; intermediate size F):

- **copy** (granularity G = 1): every expert is the whole MLP;
- **virtual groups** (G > 1, fine-grained): the MLP's F columns are cut into G slices of F/G; expert e holds
  slice (e mod S) mod G of its *virtual group* e // S, a block of S consecutive experts whose router rows are
  identical (one random row per group, repeated S times).

Why the function is unchanged. A slice g of the MLP contributes s_g(x) = down[:, g] (silu(gate[g] x) * up[g] x)
and the dense output is sum_g s_g(x). The members of a group share their router logit, so when S divides K
the top-K picks whole groups (the K/S groups with the largest logits; logits of different groups tie with
probability zero). With top-k weights renormalised to sum to one (Mixtral always; Qwen3-MoE when
`norm_topk_prob`), the selected groups' weights sum to 1 and are shared equally by each group's S members, so
slice g, held by n_g of a group's members, receives a total weight of n_g / S. Scaling expert e by
S / n_(shard of e) therefore gives sum_g s_g(x) exactly, for every x and any router. The scale is split
evenly (its square root each) between `up` and `down`, both linear in the output, so silu sees the dense
gate pre-activation unchanged (Megatron's cube-root split over gate, up and down is exact only for linear
activations).

The rule, stated once:
- S = the smallest divisor of gcd(top_k, experts) that is >= G; no such S -> no exact scheme, refused
  (G = 1 gives S = 1: independent router rows, every expert a copy, scale 1; G dividing both top_k and experts
  gives S = G, each slice once per group, scale G, which is the paper's virtual-group scheme);
- n_g = S // G, plus one for the first S mod G slices; expert scale S / n_g;
- top-k weights not renormalised (Qwen3-MoE `norm_topk_prob = false`): the selected probabilities sum to 1
  only when every expert is selected, so only top_k == experts is exact (the paper's E*G/K scaling matches the
  dense output only in expectation under a uniform router); other top_k are refused.

The router rows are drawn from normal(0, router_std) with a seeded generator, layer by layer. Neither target
family has shared experts (Qwen2-MoE's gated shared expert is the family that does, and it is not an
upcycling target here), so `shared_experts` > 0 is refused.

Which dense models fit which family, exactly: Llama and Mistral into Mixtral (no QK-norm, no biases; Mistral's
sliding window kept); Qwen3 into Qwen3-MoE (QK-norm, optional qkv/o biases; a window on every layer or none).
Llama/Mistral into Qwen3-MoE is refused (Qwen3-MoE always normalises q and k per head) and Qwen3 into Mixtral
too (Mixtral has no QK-norm).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moecpt.errors import UserError
from moecpt.model import hf
from moecpt.model.auto import build_model
from moecpt.model.families import family as family_by_type
from moecpt.model.layers import DecoderLayer
from moecpt.model.moe import DenseMLP, SparseMoeBlock
from moecpt.tools.common import copy_tokenizer_files

DENSE_TYPES = ("llama", "mistral", "qwen3")
TARGETS = ("mixtral", "qwen3_moe")
# (dense model_type, target family) -> why the target cannot compute the dense function (None: it can)
_QK_NORM = ("{dense} has no QK-norm and qwen3_moe always normalises q and k per head, so the function "
            "cannot be kept; upcycle {dense} into mixtral")
INEXPRESSIBLE = {
    ("llama", "qwen3_moe"): _QK_NORM.format(dense="llama"),
    ("mistral", "qwen3_moe"): _QK_NORM.format(dense="mistral"),
    ("qwen3", "mixtral"): "qwen3 normalises q and k per head (QK-norm), which mixtral has not; upcycle qwen3 "
                          "into qwen3_moe",
}
METADATA = "upcycle.json"


@dataclass(frozen=True)
class ExpertPlan:
    """Which slice of the dense MLP each expert holds and by how much it is scaled (see the module's rule)."""

    experts: int
    top_k: int
    granularity: int
    group: int  # S: experts per virtual group (identical router rows)
    shard: tuple[int, ...]  # per expert: the slice of the dense MLP it holds
    scale: tuple[float, ...]  # per expert: the factor its output is scaled by


def expert_plan(experts: int, top_k: int, granularity: int = 1, renormalised: bool = True) -> ExpertPlan:
    """The exact initialisation of `experts` experts, `top_k` per token, each 1/`granularity` of the MLP."""
    E, K, G = experts, top_k, granularity
    if min(E, K, G) < 1 or K > E:
        raise UserError(f"upcycle: need experts >= top_k >= 1 and granularity >= 1 (got experts={E}, top_k={K}, "
                        f"granularity={G})")
    if not renormalised and K != E:
        raise UserError(f"upcycle: with top-k weights that are not renormalised (norm_topk_prob = false) the "
                        f"selected probabilities sum to 1 only when every expert is selected, so no initialisation "
                        f"keeps the dense function for top_k={K} < experts={E}; use norm_topk_prob = true")
    common = math.gcd(K, E)
    S = next((s for s in range(G, common + 1) if common % s == 0), None)
    if S is None:
        raise UserError(f"upcycle: granularity {G} with top_k={K} and experts={E} has no exact virtual-group "
                        f"initialisation: it needs a group size S >= {G} dividing both top_k and experts (the "
                        f"top-k must select whole groups that hold every slice); choose top_k and experts that "
                        f"are multiples of the granularity")
    counts = [S // G + (1 if g < S % G else 0) for g in range(G)]
    shard = tuple((e % S) % G for e in range(E))
    return ExpertPlan(E, K, G, S, shard, tuple(S / counts[g] for g in shard))


# ---- the dense model's config ------------------------------------------------------------------------------
def _windowed_layers(d: dict) -> list[int]:
    """The layers a dense Qwen3 attends within a sliding window (transformers: layer_types, or the layers from
    max_window_layers on, and only with use_sliding_window)."""
    if not d.get("use_sliding_window") or d.get("sliding_window") is None:
        return []
    n = int(d["num_hidden_layers"])
    types = d.get("layer_types")
    if types:
        return [i for i, t in enumerate(types) if t == "sliding_attention"]
    return list(range(int(d.get("max_window_layers") or 0), n))


def _refuse_dense_features(d: dict, source: str, family: str) -> None:
    dense = d.get("model_type")
    if dense not in DENSE_TYPES:
        raise UserError(f"{source}: model_type is {dense!r}; moecpt upcycles dense {', '.join(DENSE_TYPES)} models")
    if family not in TARGETS:
        raise UserError(f"upcycle: family {family!r}: choose one of {', '.join(TARGETS)}")
    if (dense, family) in INEXPRESSIBLE:
        raise UserError(f"{source}: {INEXPRESSIBLE[dense, family]}")
    if d.get("mlp_bias"):
        raise UserError(f"{source}: mlp_bias = true: the MLP biases have no place in {family}'s experts")
    if d.get("attention_bias") and family == "mixtral":
        raise UserError(f"{source}: attention_bias = true: mixtral's attention has no biases; the dense model "
                        "cannot be upcycled into it exactly")
    if d.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: hidden_act {d['hidden_act']!r}: the experts of {family} are SiLU-gated")
    windowed = _windowed_layers(d) if dense == "qwen3" else []
    if windowed and len(windowed) != int(d["num_hidden_layers"]):
        raise UserError(f"{source}: layers {windowed[0]}.. attend within a sliding window and the others do not "
                        "(use_sliding_window with max_window_layers or layer_types); qwen3_moe windows every "
                        "layer or none")


def moe_config(d: dict, source: str, family: str, experts: int, top_k: int, granularity: int = 1,
               norm_topk_prob: bool = True):
    """The MoE family's config for a dense `config.json` dict: the dense shapes with E experts of F/G each."""
    _refuse_dense_features(d, source, family)
    F = int(d.get("intermediate_size", 0))
    if F <= 0 or F % granularity:
        raise UserError(f"{source}: intermediate_size {F} is not divisible by granularity {granularity}")
    t = {k: v for k, v in d.items() if k not in ("model_type", "architectures", "layer_types")}
    if family == "mixtral":
        if not norm_topk_prob:
            raise UserError("upcycle: mixtral always renormalises its top-k weights; norm_topk_prob = false is "
                            "for qwen3_moe")
        t |= {"intermediate_size": F // granularity, "num_local_experts": experts, "num_experts_per_tok": top_k}
    else:
        windowed = bool(_windowed_layers(d))
        t |= {"intermediate_size": F, "moe_intermediate_size": F // granularity, "num_experts": experts,
              "num_experts_per_tok": top_k, "norm_topk_prob": norm_topk_prob, "decoder_sparse_step": 1,
              "mlp_only_layers": [], "use_sliding_window": windowed,
              "sliding_window": d.get("sliding_window") if windowed else None,
              "max_window_layers": 0 if windowed else d.get("max_window_layers")}
    return family_by_type(family).config_cls.from_hf_dict({**t, "model_type": family}, source=source)


# ---- tensors -----------------------------------------------------------------------------------------------
def dense_mlp_names(layer_prefix: str) -> dict[str, str]:
    """moecpt's names of a dense layer's MLP weights (gate, up, down): the layer as the model builds it."""
    with torch.device("meta"):
        mlp = DenseMLP(1, 1)
        layer = DecoderLayer(1, 1e-6, torch.nn.Identity(), mlp, sparse=False)
    attr = next(n for n, m in layer.named_children() if m is mlp)
    names = {id(p): n for n, p in mlp.named_parameters()}
    roles = (("gate", mlp.gate_proj.weight), ("up", mlp.up_proj.weight), ("down", mlp.down_proj.weight))
    return {role: f"{layer_prefix}{attr}.{names[id(p)]}" for role, p in roles}


def experts_from_dense(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, plan: ExpertPlan
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """moecpt's stacked expert weights [E, 2F/G, H] (gate rows, then up rows) and [E, H, F/G] from a dense
    MLP's gate [F, H], up [F, H] and down [H, F], sliced and scaled by `plan`."""
    f = gate.shape[0] // plan.granularity
    gate_up, down_E = [], []
    for shard, scale in zip(plan.shard, plan.scale, strict=True):
        cols = slice(shard * f, (shard + 1) * f)
        root = math.sqrt(scale)
        gate_up.append(torch.cat([gate[cols], up[cols] * root if scale != 1 else up[cols]]))
        down_E.append(down[:, cols] * root if scale != 1 else down[:, cols])
    return torch.stack(gate_up), torch.stack(down_E)


def _moe_state(config, dense: hf.SafetensorsDir, plan: ExpertPlan, generator: torch.Generator,
               router_std: float, source: str) -> dict[str, torch.Tensor]:
    """The MoE model's state dict (moecpt names, fp32) from the dense model's tensors."""
    adapter = family_by_type(config.model_type).adapter_cls(config)
    with torch.device("meta"):
        model = build_model(config)
    blocks = {name + ".": m for name, m in model.named_modules() if isinstance(m, SparseMoeBlock)}
    expected = {adapter.hf_name(n, "hub"): s for n, s in adapter.state_shapes().items()
                if not any(n.startswith(p) for p in blocks)}
    mlp_names = {}
    for p in blocks:
        layer_prefix = p[: p.rstrip(".").rfind(".") + 1]
        mlp_names[p] = {role: adapter.hf_name(n, "hub") for role, n in dense_mlp_names(layer_prefix).items()}
        F, H = plan.granularity * config.expert_ffn, config.hidden_size
        expected |= {mlp_names[p]["gate"]: (F, H), mlp_names[p]["up"]: (F, H), mlp_names[p]["down"]: (H, F)}
    hf.check_tensors(dense, expected, source, optional=adapter.optional_hf_shapes())

    state = {n: dense.get(adapter.hf_name(n, "hub")).float() for n in adapter.state_shapes()
             if not any(n.startswith(p) for p in blocks)}
    for p, block in blocks.items():
        gate_up, down = experts_from_dense(*(dense.get(mlp_names[p][r]).float() for r in ("gate", "up", "down")),
                                           plan)
        rows = torch.empty(plan.experts // plan.group, config.hidden_size).normal_(0.0, router_std,
                                                                                   generator=generator)
        values = {id(block.gate.weight): rows.repeat_interleave(plan.group, dim=0),
                  id(block.experts.gate_up_proj): gate_up, id(block.experts.down_proj): down}
        for name, t in [*block.named_parameters(), *block.named_buffers()]:
            if id(t) not in values and t.dtype.is_floating_point and name.endswith("bias"):
                values[id(t)] = torch.zeros(t.shape)  # a router selection bias starts at zero
            if id(t) not in values:
                raise UserError(f"upcycle: {config.model_type}'s MoE block has {name}, which upcycling does not "
                                "know how to initialise")
            state[p + name] = values[id(t)]
    return state


def upcycle(dense_dir: str | Path, out_dir: str | Path, family: str = "mixtral", experts: int = 8, top_k: int = 2,
            granularity: int = 1, shared_experts: int = 0, seed: int = 0, router_std: float | None = None,
            norm_topk_prob: bool = True) -> Path:
    """Write `out_dir`: the dense Hugging Face model in `dense_dir` upcycled into `family` with `experts`
    experts, `top_k` per token, each 1/`granularity` of the dense MLP (see the module's docstring for the
    exact rule and what is refused). `router_std`: the router's init std (default: the dense config's
    initializer_range). The weights keep the dense checkpoint's dtype; the tokenizer files are copied, and
    `upcycle.json` records the plan."""
    dense_dir, out_dir = Path(dense_dir), Path(out_dir)
    if shared_experts:
        raise UserError(f"upcycle: shared_experts = {shared_experts}: neither mixtral nor qwen3_moe has shared "
                        "experts (of moecpt's families only qwen2_moe has one, gated); use 0")
    d = hf.read_config_json(dense_dir)
    source = str(dense_dir / "config.json")
    config = moe_config(d, source, family, experts, top_k, granularity, norm_topk_prob)
    plan = expert_plan(experts, top_k, granularity, renormalised=family == "mixtral" or norm_topk_prob)
    std = float(d.get("initializer_range", 0.02) if router_std is None else router_std)
    if not std > 0 or not math.isfinite(std):
        raise UserError(f"upcycle: router_std must be a positive number, got {router_std}")
    dense = hf.SafetensorsDir(dense_dir)
    dtype = dense.get(next(iter(sorted(dense.names())))).dtype
    state = _moe_state(config, dense, plan, torch.Generator().manual_seed(seed), std, source)
    model = build_model(config)
    if config.tie_word_embeddings:
        state[_tied_alias(model)] = state[_tied_source(model)]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.save_pretrained(out_dir, dtype=dtype)
    copied = copy_tokenizer_files(dense_dir, out_dir)
    info = {"dense": str(dense_dir), "dense_model_type": d["model_type"], "family": family, "seed": seed,
            "router_std": std, "tokenizer_files": copied, **asdict(plan)}
    (out_dir / METADATA).write_text(json.dumps(info, indent=1) + "\n")
    return out_dir


def _tied_source(model) -> str:
    return next(n for n, p in model.named_parameters() if p is model.embed_tokens.weight)


def _tied_alias(model) -> str:
    return next(n for n, p in model.named_parameters(remove_duplicate=False)
                if p is model.lm_head.weight and n != _tied_source(model))
