"""Capacity planning: per-GPU memory of a training layout, and the largest micro-batch that fits.

Formulas (N GPUs, ep expert-parallel size, P parameters, a = bytes of the compute dtype: 2 for bf16):

* Sharded training state (ZeRO-3: FSDP shards every parameter over N ranks; under EP the experts are split
  over ep ranks and each expert shard over the N / ep others, so still 1/N of every tensor):
  fp32 master weights 4 B, fp32 gradients 4 B (reduced in fp32), AdamW exp_avg + exp_avg_sq 8 B per parameter
  -> 16 P / N bytes (largest shard: FSDP pads a dim that N does not divide).
* Gathered weights (transient, compute dtype): FSDP gathers one decoder block at a time and prefetches the
  next, and keeps the root (embeddings, LM head) gathered during forward and backward: a * (2 * block + root),
  where a block holds its dense weights plus its E / ep local experts. The backward also holds one block's
  unsharded gradients (a + 4 bytes per parameter). Without `reshard_after_forward` every block stays gathered
  (a * all blocks); with `accumulate_unsharded` the unsharded gradients of the whole model stay too (4 B each).
* Activations per token and layer: the bytes autograd saves in `moecpt.model` (counted, and re-checked by
  `tests/parallel/test_plan.py` against the saved tensors of real forwards of several families), read
  layer by layer from the model built on the meta device:
  attention   fp32: 21 H + 9 q + 8 kv        bf16: 19.125 H + 5 q + 4 kv
  + QK-norm   fp32: 8 (q + kv) + 4 h         bf16: 6 (q + kv) + 4 h
  MoE block   fp32: K (16 F + 8 H + 32) + 12 E + 36   bf16: K (8 F + 4 H + 30) + 14 E + 28
  + shared    fp32: 16 Fs + 4 H              bf16: 7 Fs + 5.5 H     (sigmoid-gated, Qwen2-MoE)
              fp32: 16 Fs                    bf16: 8 Fs + 4 H       (ungated, DeepSeek)
  dense MLP   fp32: 16 Fd + H / 2            bf16: 7 Fd (8 Fd beside MLA or sinks, counted term by term)
  (H hidden, q and kv the query and key/value widths, h the query + kv heads, F the expert ffn, K experts
  per token, E experts, Fs / Fd the shared expert's / dense MLP's ffn). Counted term by term, with norms
  N(w) = (4 + 2a) w + 4 (fp32 input, normalised and output copies, rstd) and a the compute dtype's bytes:
  MLA         8 H + 4 + N(H) + N(q_lora) + N(kv_lora) [+ 4 r in fp32] + 8 r (cos, sin)
              + a (2 h (nope + r) + h (nope + v) + h v) + 4 h
              (r, nope, v: qk_rope, qk_nope and v head dims; q and k of nope + r per head are kept by the
              attention kernel, the kv_b output [nope | v] per head holds v, and the output of v per head)
  sinks       8 H + 4 + N(H) + 8 D + a (2 h (D + 8) + 2 h D) + 4 h + a (T + 1)
              (q and k padded by SINK_PAD = 8 and one key more, the kv heads repeated to the h query heads
              for the masked kernel; the [T, T + 1] mask as the kernel's bias,
              counted per sequence: exact at micro-batch 1, more than enough above)
  experts with biases and the clamped SwiGLU (gpt-oss): 28 F (fp32) or 14 F + 2 H / K (bf16) in place of
  16 F or 8 F per routed row.
  This assumes a fused attention kernel on the GPU (flash or memory-efficient: q, k, v, output and
  logsumexp, never the T x T probabilities). A multi-token prediction depth (DeepSeek, only when
  mtp_loss_coef > 0) is its MoE decoder layer + 3 N(H) + 4 a H + 16. With activation checkpointing a
  layer keeps only its input (a H) and one layer is recomputed at a time. The chunked LM head and loss keep
  a H + 8 bytes per token and, transiently, one chunk's logits: CHUNK_TOKENS x V x (a + 4) bytes.
* Multi-token prediction layers are FSDP units of their own, like decoder blocks (`parallelize.apply_fsdp`;
  their routed experts split over EP like a block's): trained (mtp_loss_coef > 0), each is gathered in turn
  like a block; untrained they never run, so they are never gathered and get no gradients and no AdamW
  state: 4 B per parameter / N.
* Verdict: when no layout fits, the plan says why (the sharded state alone over the usable memory, or one
  sequence with the leanest layout) and what it would take: pipeline parallelism, which moecpt does not
  have, or the fewest GPUs (whole nodes of 8) on which FSDP + EP holds one sequence.
* Usable memory: `--reserve` (default 10%) of each GPU is left for the CUDA context, allocator fragmentation,
  collective buffers and kernel workspaces, which this plan does not model.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from moecpt.config import CHUNK_TOKENS
from moecpt.kernels.attention import SINK_PAD
from moecpt.model import build_model, param_shapes
from moecpt.model.moe import SparseMoeBlock

GB = 1e9
GiB = 2**30


@dataclass(frozen=True)
class Layout:
    gpus: int
    expert_parallel: int = 1
    reshard_after_forward: bool = True
    accumulate_unsharded: bool = False
    activation_checkpointing: bool = False
    dtype_bytes: int = 2  # 2: bf16 compute (FSDP param_dtype); 4: fp32


@dataclass
class MemoryPlan:
    layout: Layout
    params: float  # fp32 master shard
    grads: float  # fp32 gradient shard
    optimizer: float  # AdamW states
    gathered: float  # transient unsharded weights and gradients
    activations_per_sample: float  # bytes per sequence of seq_len tokens
    usable: float  # GPU bytes after the reserve
    max_micro_batch: int  # largest micro-batch that fits (0: not even one sequence)

    @property
    def static(self) -> float:
        return self.params + self.grads + self.optimizer + self.gathered

    def total(self, micro_batch: int) -> float:
        return self.static + micro_batch * self.activations_per_sample


def parameter_shapes(c) -> list[tuple[str, tuple[int, ...]]]:
    """Every parameter's name and shape, without building the model (the family adapter's table)."""
    return list(_shapes(c))


@functools.lru_cache(maxsize=32)
def _shapes(c) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple(param_shapes(c).items())


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def shard_numel(name: str, shape: tuple[int, ...], gpus: int, ep: int) -> int:
    """Elements of the largest shard FSDP (and EP) give one rank, as `parallelize.apply_fsdp` lays them out:
    one dim split in ceil-sized chunks over the ranks; experts first split over ep ranks on dim 0, then over
    the gpus / ep ranks holding the same experts."""
    from moecpt.parallel.parallelize import shard_dim

    if gpus == 1:
        return _numel(shape)
    ranks = gpus
    if ".experts." in name and ep > 1:
        shape, ranks = (shape[0] // ep, *shape[1:]), gpus // ep
    chunk = list(shape)
    d = shard_dim(shape, ranks)
    chunk[d] = math.ceil(shape[d] / ranks)
    return _numel(tuple(chunk))


def attention_activation_bytes(attn, H: int, a: int, seq_len: int) -> float:
    """Bytes autograd keeps per token for one layer's attention with its two norms and residuals (module
    docstring): multi-head latent attention (DeepSeek), attention with sinks (gpt-oss) or grouped-query
    attention (with QK-norm)."""
    norms = 8 * H + 4 + (4 + 2 * a) * H + 4  # input norm (its input is the layer's), post-attention norm
    if hasattr(attn, "kv_b_proj"):  # MLA: q/k of qk_nope + qk_rope per head, v of v_head_dim
        c = attn.c
        h, r, v = c.num_attention_heads, c.qk_rope_head_dim, c.v_head_dim
        # kv_a_layernorm keeps the latent (in fp32 the whole kv_a output, rotary key included) in fp32
        total = norms + (4 + 2 * a) * c.kv_lora_rank + 4 + (4 * r if a == 4 else 0)
        if c.q_lora_rank is not None:
            total += (4 + 2 * a) * c.q_lora_rank + 4
        return total + 8 * r + a * (2 * h * c.qk_head_dim + h * (c.qk_nope_head_dim + v) + h * v) + 4 * h
    h, kv, D = attn.n_heads, attn.n_kv, attn.head_dim
    if hasattr(attn, "sinks"):  # q and k padded by SINK_PAD, one more key, the mask as a bias, and the kv
        # heads repeated to the query heads (a masked call: see moecpt.kernels.attention.sdpa)
        return norms + 8 * D + a * (2 * h * (D + SINK_PAD) + 2 * h * D) + 4 * h + a * (seq_len + 1)
    q, kv_width = h * D, kv * D
    total = (21 * H + 9 * q + 8 * kv_width) if a == 4 else (19.125 * H + 5 * q + 4 * kv_width)
    if attn.qk_norm is not None:
        total += (8 if a == 4 else 6) * (q + kv_width) + 4 * (h + kv)
    return total


def ffn_activation_bytes(ffn, H: int, a: int, fitted: bool = True) -> float:
    """Bytes autograd keeps per token for a sparse MoE block (experts with biases and the clamped SwiGLU
    keep more per routed row; a shared expert) or a dense MLP."""
    if not isinstance(ffn, SparseMoeBlock):
        # (7 Fd in bf16 goes with the fitted GQA coefficients; counted beside MLA or sinks it is 8 Fd)
        Fd = ffn.gate_proj.out_features
        return 16 * Fd + H / 2 if a == 4 else (7 if fitted else 8) * Fd
    K, E, F = ffn.top_k, ffn.num_experts, ffn.experts.down_proj.shape[-1]
    per_f = (28 if a == 4 else 14) if hasattr(ffn.experts, "gate_up_proj_bias") else (16 if a == 4 else 8)
    total = K * (per_f * F + 8 * H + 32) + 12 * E + 36 if a == 4 else K * (per_f * F + 4 * H + 30) + 14 * E + 28
    if hasattr(ffn.experts, "gate_up_proj_bias") and a == 2:
        total += 2 * H  # the router's fp32 copy of its input, beside attention that is counted term by term
    if hasattr(ffn, "shared_expert"):
        Fs = ffn.shared_expert.gate_proj.out_features
        if hasattr(ffn, "shared_expert_gate"):  # Qwen2-MoE's sigmoid-gated shared expert
            total += 16 * Fs + 4 * H if a == 4 else 7 * Fs + 5.5 * H
        else:  # DeepSeek's shared experts: a plain SwiGLU MLP
            total += 16 * Fs if a == 4 else 8 * Fs + 4 * H
    return total


def layer_activation_bytes(layer, H: int, a: int, seq_len: int) -> float:
    """Bytes autograd keeps per token in one decoder layer (see the module docstring), read from its modules."""
    ffn = getattr(layer, "moe", None) or layer.mlp
    attn = layer.self_attn
    fitted = not (hasattr(attn, "kv_b_proj") or hasattr(attn, "sinks"))
    return attention_activation_bytes(attn, H, a, seq_len) + ffn_activation_bytes(ffn, H, a, fitted)


def mtp_activation_bytes(depth, H: int, a: int, seq_len: int) -> float:
    """A multi-token prediction depth (DeepSeek), run only when mtp_loss_coef > 0: its MoE decoder layer, the
    enorm, hnorm and head norms, the [embedding | hidden] concatenation and its projection, and its loss's
    final hidden states."""
    return layer_activation_bytes(depth.block, H, a, seq_len) + 3 * ((4 + 2 * a) * H + 4) + 4 * a * H + 16


@functools.lru_cache(maxsize=32)
def activation_bytes_per_token_layer(c, dtype_bytes: int, seq_len: int = 4096) -> tuple[float, ...]:
    """Bytes autograd keeps per token in each decoder layer of the model `c` describes (built on the meta
    device, so its real attention and feed-forward modules are read), then each multi-token prediction
    depth that is trained (mtp_loss_coef > 0)."""
    model = build_model(c)
    out = [layer_activation_bytes(layer, c.hidden_size, dtype_bytes, seq_len) for layer in model.layers]
    if getattr(c, "mtp_loss_coef", 0) and hasattr(model, "mtp"):
        out += [mtp_activation_bytes(d, c.hidden_size, dtype_bytes, seq_len) for d in model.mtp]
    return tuple(out)


def activation_bytes_per_sample(c, seq_len: int, dtype_bytes: int, checkpointing: bool) -> float:
    per_layer = activation_bytes_per_token_layer(c, dtype_bytes, seq_len)
    if checkpointing:
        layers = len(per_layer) * dtype_bytes * c.hidden_size + max(per_layer)
    else:
        layers = sum(per_layer)
    head = dtype_bytes * c.hidden_size + 8  # the chunked loss keeps the final hidden states, not the logits
    return seq_len * (layers + head)


def loss_chunk_bytes(c, dtype_bytes: int, chunk_tokens: int = CHUNK_TOKENS) -> float:
    """The chunked LM head + loss's transient memory: one chunk's logits in the compute dtype and in fp32."""
    return chunk_tokens * c.vocab_size * (dtype_bytes + 4)


def trained(c, name: str) -> bool:
    """Whether a parameter gets gradients and AdamW state: all but the multi-token prediction layers of a
    model that keeps them without training them (mtp_loss_coef = 0: never run, no gradient)."""
    return not (name.startswith("mtp.") and not getattr(c, "mtp_loss_coef", 0))


def gathered_numels(c, ep: int) -> tuple[dict[str, int], int]:
    """Elements one rank gathers: per block (dense weights in full, its E / ep local experts), and the root
    FSDP unit, which `parallelize.apply_fsdp` keeps gathered: embeddings, final norm, LM head. A block is a
    decoder layer or a trained multi-token prediction depth (an untrained one never runs: never gathered)."""
    blocks: dict[str, int] = {}
    root = 0
    for name, s in parameter_shapes(c):
        numel = _numel(s) // (ep if ".experts." in name else 1)
        if name.startswith(("layers.", "mtp.")):
            if not trained(c, name):
                continue
            block = ".".join(name.split(".")[:2])
            blocks[block] = blocks.get(block, 0) + numel
        else:
            root += numel
    return blocks, root


def plan_memory(c, layout: Layout, seq_len: int, gpu_memory: float, reserve: float = 0.1,
                max_micro_batch: int = 1024) -> MemoryPlan:
    n, ep, a = layout.gpus, layout.expert_parallel, layout.dtype_bytes
    shapes = parameter_shapes(c)
    shard = sum(shard_numel(name, s, n, ep) for name, s in shapes)
    shard_trained = sum(shard_numel(name, s, n, ep) for name, s in shapes if trained(c, name))
    blocks, root = gathered_numels(c, ep)
    block, all_blocks = max(blocks.values()), sum(blocks.values())
    if n == 1:
        gathered = 0.0  # nothing is sharded: the fp32 weights are used (autocast casts per op)
    elif not layout.reshard_after_forward or layout.accumulate_unsharded:
        gathered = a * (all_blocks + root) + (a + 4) * block
        if layout.accumulate_unsharded:
            gathered += 4 * (all_blocks + root)
    else:
        gathered = a * (2 * block + root) + (a + 4) * block
    gathered += loss_chunk_bytes(c, a)
    act = activation_bytes_per_sample(c, seq_len, a, layout.activation_checkpointing)
    usable = gpu_memory * (1 - reserve)
    plan = MemoryPlan(layout=layout, params=4.0 * shard, grads=4.0 * shard_trained, optimizer=8.0 * shard_trained,
                      gathered=gathered, activations_per_sample=act, usable=usable, max_micro_batch=0)
    room = usable - plan.static
    plan.max_micro_batch = max(0, min(max_micro_batch, int(room // act))) if room > 0 else 0
    return plan


def candidate_layouts(c, gpus: int, dtype_bytes: int) -> list[Layout]:
    """The layouts worth comparing: EP sizes that divide both the GPUs and the experts, reshard or not, with
    and without activation checkpointing."""
    eps = [e for e in range(1, min(gpus, c.n_experts) + 1) if gpus % e == 0 and c.n_experts % e == 0]
    out = []
    for ep in eps:
        for reshard in (True, False):
            for ac in (False, True):
                out.append(Layout(gpus=gpus, expert_parallel=ep, reshard_after_forward=reshard,
                                  activation_checkpointing=ac, dtype_bytes=dtype_bytes))
    return out


def best_micro_batch(plan: MemoryPlan, global_batch: int) -> int:
    """The largest micro-batch that fits and splits the global batch evenly over the GPUs (0: none)."""
    per_rank, rem = divmod(global_batch, plan.layout.gpus)
    if rem:
        return 0
    for mb in range(min(plan.max_micro_batch, per_rank), 0, -1):
        if per_rank % mb == 0:
            return mb
    return 0


def parse_memory(text: str) -> float:
    """'80GB' (10^9), '80GiB' (2^30) or a number of bytes."""
    t = text.strip().upper()
    for suffix, scale in (("GIB", GiB), ("GB", GB), ("G", GB), ("MIB", 2**20), ("MB", 1e6)):
        if t.endswith(suffix):
            return float(t[: -len(suffix)]) * scale
    return float(t)


def layers_line(c) -> str:
    """What the plan counts beyond the decoder layers' kinds: dense and MoE layers, multi-token prediction."""
    sparse = len(getattr(c, "sparse_layers", range(c.num_hidden_layers)))
    text = f"layers: {c.num_hidden_layers - sparse} dense + {sparse} MoE"
    mtp = sum(1 for name, _ in parameter_shapes(c) if name.startswith("mtp.") and name.endswith(".enorm.weight"))
    if mtp:
        text += (f" + {mtp} multi-token prediction, each its own FSDP unit ("
                 + ("trained: mtp_loss_coef > 0)" if getattr(c, "mtp_loss_coef", 0)
                    else "kept, not trained: fp32 weights only, no gradients or AdamW state)"))
    return text


def format_plan(c, plans: list[MemoryPlan], seq_len: int, global_batch: int) -> str:
    n = plans[0].layout.gpus
    p_total = sum(_numel(s) for _, s in parameter_shapes(c))
    lines = [
        f"model: {p_total / 1e9:.2f}B parameters, {c.num_hidden_layers} layers, {c.n_experts} experts "
        f"(top-{c.top_k}); {n} GPUs, {plans[0].usable / GB:.1f} GB usable per GPU; "
        f"seq_len {seq_len}, global batch {global_batch} sequences",
        layers_line(c),
        "sharded state per GPU: fp32 params + fp32 grads + AdamW states = 16 bytes x P / N; memory in GB (1e9)",
        "",
        f"{'EP':>3} {'reshard':>7} {'AC':>3} | {'params':>7} {'grads':>7} {'optim':>7} {'gathered':>8} "
        f"{'act/seq':>8} | {'max mb':>6} {'use mb':>6} {'accum':>5} {'total':>7}",
    ]
    for p in plans:
        lay = p.layout
        mb = best_micro_batch(p, global_batch)
        accum = global_batch // (mb * n) if mb else 0
        total = f"{p.total(mb) / GB:7.1f}" if mb else f"{'OOM':>7}"
        lines.append(
            f"{lay.expert_parallel:>3} {'yes' if lay.reshard_after_forward else 'no':>7} "
            f"{'on' if lay.activation_checkpointing else 'off':>3} | {p.params / GB:7.2f} {p.grads / GB:7.2f} "
            f"{p.optimizer / GB:7.2f} {p.gathered / GB:8.2f} {p.activations_per_sample / GB:8.2f} | "
            f"{p.max_micro_batch:>6} {mb:>6} {accum:>5} {total}")
    fits = [p for p in plans if best_micro_batch(p, global_batch)]
    if fits:
        # The largest micro-batch (fewest accumulation passes); then no recomputation; then the most headroom.
        best = max(fits, key=lambda p: (best_micro_batch(p, global_batch), not p.layout.activation_checkpointing,
                                        -p.total(best_micro_batch(p, global_batch))))
        lay = best.layout
        lines += ["", f"verdict: FSDP + EP fits on {n} GPUs; no pipeline parallelism needed",
                  f"suggested: --parallel.expert_parallel={lay.expert_parallel} "
                  f"--parallel.reshard_after_forward={str(lay.reshard_after_forward).lower()} "
                  f"--parallel.activation_checkpointing={str(lay.activation_checkpointing).lower()} "
                  f"--training.micro_batch={best_micro_batch(best, global_batch)}"]
    elif any(p.max_micro_batch for p in plans):
        lines += ["", f"no layout: the global batch ({global_batch} sequences) does not split evenly over {n} GPUs; "
                      "choose a GPU count that divides it, or another training.global_batch"]
    else:
        lines += [""] + needs_lines(c, plans, seq_len)
    return "\n".join(lines)


def lean_plan(c, gpus: int, seq_len: int, usable: float, dtype_bytes: int) -> MemoryPlan:
    """The layout with the least memory for one sequence: resharding and activation checkpointing, at the EP
    size that leaves the smallest shards (not always the largest: FSDP's uneven chunks)."""
    eps = [e for e in range(1, min(gpus, c.n_experts) + 1) if gpus % e == 0 and c.n_experts % e == 0]
    plans = [plan_memory(c, Layout(gpus=gpus, expert_parallel=e, activation_checkpointing=True,
                                   dtype_bytes=dtype_bytes), seq_len, usable, reserve=0.0) for e in eps]
    return min(plans, key=lambda p: p.total(1))


def min_gpus(c, seq_len: int, usable: float, dtype_bytes: int, start: int, limit: int = 65536) -> int | None:
    """The fewest GPUs (whole nodes of 8) above `start` on which the leanest layout holds one sequence."""
    for gpus in range((start // 8 + 1) * 8, limit + 1, 8):
        if lean_plan(c, gpus, seq_len, usable, dtype_bytes).max_micro_batch:
            return gpus
    return None


def needs_lines(c, plans: list[MemoryPlan], seq_len: int) -> list[str]:
    """Why no FSDP + EP layout fits, and what it would take: more GPUs, or pipeline parallelism (not in moecpt)."""
    n, usable, a = plans[0].layout.gpus, plans[0].usable, plans[0].layout.dtype_bytes
    state = min(p.params + p.grads + p.optimizer for p in plans)
    lean = lean_plan(c, n, seq_len, usable, a)
    if state > usable:
        why = (f"the sharded training state alone (fp32 weights, gradients and AdamW states over {n} GPUs) is "
               f"{state / GB:.1f} GB per GPU, over the {usable / GB:.1f} GB usable")
    else:
        why = (f"even the leanest layout (EP {lean.layout.expert_parallel}, resharding, activation checkpointing) "
               f"needs {lean.total(1) / GB:.1f} GB for one sequence of {seq_len} tokens, over the "
               f"{usable / GB:.1f} GB usable")
    more = min_gpus(c, seq_len, usable, a, n)
    more_text = (f"FSDP + EP on at least {more} such GPUs (EP {lean_plan(c, more, seq_len, usable, a).layout.expert_parallel}"
                 ", activation checkpointing, micro-batch 1)" if more else "no GPU count up to 65,536 fits FSDP + EP")
    return [f"verdict: FSDP + EP does not fit on {n} GPUs: {why}.",
            f"needs: pipeline parallelism, which moecpt does not have (split the layers over stages so that each GPU "
            f"holds only its stage's share), or {more_text}"]
