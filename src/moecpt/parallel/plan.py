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
  + shared    fp32: 16 Fs + 4 H              bf16: 7 Fs + 5.5 H
  dense MLP   fp32: 16 Fd + H / 2            bf16: 7 Fd
  (H hidden, q and kv the query and key/value widths, h the query + kv heads, F the expert ffn, K experts
  per token, E experts, Fs / Fd the shared expert's / dense MLP's ffn). With activation checkpointing a
  layer keeps only its input (a H) and one layer is recomputed at a time. The chunked LM head and loss keep
  a H + 8 bytes per token and, transiently, one chunk's logits: CHUNK_TOKENS x V x (a + 4) bytes.
* Usable memory: `--reserve` (default 10%) of each GPU is left for the CUDA context, allocator fragmentation,
  collective buffers and kernel workspaces, which this plan does not model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moecpt.config import CHUNK_TOKENS
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
    return list(param_shapes(c).items())


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


def layer_activation_bytes(attn, ffn, H: int, a: int) -> float:
    """Bytes autograd keeps per token in one decoder layer (see the module docstring), read from the
    layer's modules: attention widths and QK-norm, and a sparse MoE block (with a shared expert) or a dense
    MLP."""
    q, kv, heads = attn.n_heads * attn.head_dim, attn.n_kv * attn.head_dim, attn.n_heads + attn.n_kv
    total = (21 * H + 9 * q + 8 * kv) if a == 4 else (19.125 * H + 5 * q + 4 * kv)
    if attn.qk_norm is not None:
        total += (8 if a == 4 else 6) * (q + kv) + 4 * heads
    if isinstance(ffn, SparseMoeBlock):
        K, E, F = ffn.top_k, ffn.num_experts, ffn.experts.down_proj.shape[-1]
        total += K * (16 * F + 8 * H + 32) + 12 * E + 36 if a == 4 else K * (8 * F + 4 * H + 30) + 14 * E + 28
        if hasattr(ffn, "shared_expert"):
            Fs = ffn.shared_expert.gate_proj.out_features
            total += 16 * Fs + 4 * H if a == 4 else 7 * Fs + 5.5 * H
    else:
        total += 16 * ffn.gate_proj.out_features + H / 2 if a == 4 else 7 * ffn.gate_proj.out_features
    return total


def activation_bytes_per_token_layer(c, dtype_bytes: int) -> list[float]:
    """Bytes autograd keeps per token in each decoder layer of the model `c` describes (built on the meta
    device, so its real attention and feed-forward modules are read)."""
    model = build_model(c)
    return [layer_activation_bytes(layer.self_attn, getattr(layer, "moe", None) or layer.mlp, c.hidden_size,
                                   dtype_bytes) for layer in model.layers]


def activation_bytes_per_sample(c, seq_len: int, dtype_bytes: int, checkpointing: bool) -> float:
    per_layer = activation_bytes_per_token_layer(c, dtype_bytes)
    if checkpointing:
        layers = len(per_layer) * dtype_bytes * c.hidden_size + max(per_layer)
    else:
        layers = sum(per_layer)
    head = dtype_bytes * c.hidden_size + 8  # the chunked loss keeps the final hidden states, not the logits
    return seq_len * (layers + head)


def loss_chunk_bytes(c, dtype_bytes: int, chunk_tokens: int = CHUNK_TOKENS) -> float:
    """The chunked LM head + loss's transient memory: one chunk's logits in the compute dtype and in fp32."""
    return chunk_tokens * c.vocab_size * (dtype_bytes + 4)


def plan_memory(c, layout: Layout, seq_len: int, gpu_memory: float, reserve: float = 0.1,
                max_micro_batch: int = 1024) -> MemoryPlan:
    n, ep, a = layout.gpus, layout.expert_parallel, layout.dtype_bytes
    shapes = parameter_shapes(c)
    shard = sum(shard_numel(name, s, n, ep) for name, s in shapes)
    root = sum(_numel(s) for name, s in shapes if not name.startswith("layers."))
    # One block gathered on this rank (the largest): dense weights in full, its E / ep local experts.
    blocks: dict[str, int] = {}
    for name, s in shapes:
        if name.startswith("layers."):
            layer = name.split(".")[1]
            blocks[layer] = blocks.get(layer, 0) + _numel(s) // (ep if ".experts." in name else 1)
    block = max(blocks.values())
    if n == 1:
        gathered = 0.0  # nothing is sharded: the fp32 weights are used (autocast casts per op)
    elif not layout.reshard_after_forward or layout.accumulate_unsharded:
        gathered = a * (c.num_hidden_layers * block + root) + (a + 4) * block
        if layout.accumulate_unsharded:
            gathered += 4 * (c.num_hidden_layers * block + root)
    else:
        gathered = a * (2 * block + root) + (a + 4) * block
    gathered += loss_chunk_bytes(c, a)
    act = activation_bytes_per_sample(c, seq_len, a, layout.activation_checkpointing)
    usable = gpu_memory * (1 - reserve)
    plan = MemoryPlan(layout=layout, params=4.0 * shard, grads=4.0 * shard, optimizer=8.0 * shard,
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


def format_plan(c, plans: list[MemoryPlan], seq_len: int, global_batch: int) -> str:
    n = plans[0].layout.gpus
    p_total = sum(_numel(s) for _, s in parameter_shapes(c))
    lines = [
        f"model: {p_total / 1e9:.2f}B parameters, {c.num_hidden_layers} layers, {c.n_experts} experts "
        f"(top-{c.top_k}); {n} GPUs, {plans[0].usable / GB:.1f} GB usable per GPU; "
        f"seq_len {seq_len}, global batch {global_batch} sequences",
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
        lines += ["", f"suggested: --parallel.expert_parallel={lay.expert_parallel} "
                      f"--parallel.reshard_after_forward={str(lay.reshard_after_forward).lower()} "
                      f"--parallel.activation_checkpointing={str(lay.activation_checkpointing).lower()} "
                      f"--training.micro_batch={best_micro_batch(best, global_batch)}"]
    elif global_batch % n:
        lines += ["", f"no layout: the global batch ({global_batch} sequences) does not split evenly over {n} GPUs; "
                      "choose a GPU count that divides it, or another training.global_batch"]
    else:
        lines += ["", "no layout fits: use more GPUs, or a shorter seq_len"]
    return "\n".join(lines)
