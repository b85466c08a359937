"""The one place that decides how a single-device model is distributed, in a fixed order:

    expert parallelism -> activation checkpointing -> torch.compile -> FSDP2 (per block, then root)

A block is a decoder layer or, in a family with multi-token prediction (DeepSeek-V3), one MTP depth: each is
its own FSDP unit (its routed experts a unit of their own on the expert-sharding mesh under EP), so the root
holds only the embeddings, the final norm and the LM head.

Device meshes. Every rank is a data-parallel rank (it reads its own micro-batches). Dense weights are
sharded by FSDP over all ranks (the 1-D mesh "dp"). With expert parallelism of size ep, the ranks also form
a 2-D mesh ("efsdp", "ep") of shape (world / ep, ep): rank r holds experts of EP index r % ep, and each expert
shard is further sharded by FSDP over the world / ep ranks with the same EP index. EP groups are consecutive
ranks ({0, 1}, {2, 3}, ... for ep = 2), i.e. inside a node when ep <= GPUs per node.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.utils.checkpoint import checkpoint

from moecpt.config import ParallelSection
from moecpt.errors import UserError
from moecpt.model.base import CausalLM
from moecpt.parallel.expert_parallel import apply_expert_parallel


@dataclass
class Meshes:
    dp: DeviceMesh  # all ranks: FSDP of the dense weights
    ep: DeviceMesh | None = None  # the ranks that split one layer's experts
    efsdp: DeviceMesh | None = None  # the ranks that hold the same experts: FSDP of the expert weights


def check_layout(world: int, ep: int, num_experts: int) -> None:
    """Refuse world size / EP combinations that cannot be laid out, naming the config key."""
    if ep < 1:
        raise UserError(f"config: parallel.expert_parallel must be >= 1 (got {ep})")
    if world % ep:
        raise UserError(f"config: parallel.expert_parallel ({ep}) must divide the world size ({world})")
    if num_experts % ep:
        raise UserError(f"config: parallel.expert_parallel ({ep}) must divide the number of experts "
                        f"(the model has {num_experts})")


def build_meshes(device: torch.device, world: int, ep: int) -> Meshes:
    dp = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    if ep == 1:
        return Meshes(dp=dp)
    mesh = init_device_mesh(device.type, (world // ep, ep), mesh_dim_names=("efsdp", "ep"))
    return Meshes(dp=dp, ep=mesh["ep"], efsdp=mesh["efsdp"])


def blocks(model: CausalLM) -> list[nn.Module]:
    """The decoder layers, then the multi-token prediction depths a family has (run after them, when trained)."""
    return [*model.layers, *getattr(model, "mtp", [])]


def apply_activation_checkpointing(model: CausalLM) -> None:
    """Recompute each block (decoder layer, MTP depth) in backward (keeps its inputs only). Parameter names do
    not change."""
    for layer in blocks(model):
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def apply_compile(model: CausalLM) -> None:
    """torch.compile each decoder block in place (`Module.compile`: parameter names do not change)."""
    for layer in model.layers:
        layer.compile(dynamic=True)


def shard_dim(shape: tuple[int, ...] | torch.Size, ranks: int) -> int:
    """The dim FSDP splits: dim 0, unless it has fewer entries than ranks (the expert dim of stacked experts:
    8 experts on 128 ranks would leave most ranks empty), then the largest dim."""
    if len(shape) < 2 or shape[0] >= ranks:
        return 0
    return max(range(len(shape)), key=lambda d: shape[d])


def _shard_dim(param: nn.Parameter, ranks: int) -> Shard:
    local = param.to_local() if isinstance(param, DTensor) else param
    return Shard(shard_dim(local.shape, ranks))


def apply_fsdp(model: CausalLM, meshes: Meshes, param_dtype: torch.dtype | None,
               reshard_after_forward: bool) -> None:
    """FSDP2 (ZeRO-3): each block (decoder layer, MTP depth) is one all-gather/reduce-scatter unit; the root
    holds the rest (embeddings, final norm, LM head). Expert weights under EP are their own unit on the efsdp
    mesh."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    world = meshes.dp.size()
    dense_place = functools.partial(_shard_dim, ranks=world)
    run = len(model.layers) + (len(getattr(model, "mtp", [])) if getattr(model.config, "mtp_loss_coef", 0) else 0)
    for i, layer in enumerate(blocks(model)):
        last = i == run - 1  # the last block run in forward: backward starts with it, keep it gathered
        reshard = reshard_after_forward and not last
        decoder = getattr(layer, "block", layer)  # an MTP depth's decoder layer
        if meshes.ep is not None and hasattr(decoder, "moe"):  # dense layers among the MoE ones have no experts
            experts = decoder.moe.experts
            efsdp = meshes.efsdp.size()
            fully_shard(experts, mesh=meshes.efsdp, mp_policy=mp, reshard_after_forward=reshard,
                        shard_placement_fn=functools.partial(_shard_dim, ranks=efsdp))
            # An expert's gradient arrives from all ranks through the all-to-all, then is summed over the
            # efsdp group: divide by the world size so it is the same mean as the dense weights'.
            experts.set_gradient_divide_factor(float(world))
            # gloo has no PREMUL_SUM: sum, then divide. (Not with one rank per expert shard: no collective
            # runs then, and torch 2.13 would divide twice.)
            if efsdp > 1 and dist.get_backend(meshes.efsdp.get_group()) == "gloo":
                experts.set_force_sum_reduction_for_comms(True)
        fully_shard(layer, mesh=meshes.dp, mp_policy=mp, reshard_after_forward=reshard,
                    shard_placement_fn=dense_place)
    fully_shard(model, mesh=meshes.dp, mp_policy=mp, reshard_after_forward=False, shard_placement_fn=dense_place)
    # The root returns views (logits, per-token losses); the trainer never modifies them in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def parallelize(model: CausalLM, cfg: ParallelSection, device: torch.device, world: int,
                param_dtype: torch.dtype | None) -> Meshes | None:
    """Apply the configured parallelism to `model` in place; returns the meshes (None on one process)."""
    meshes = None
    if world > 1:
        check_layout(world, cfg.expert_parallel, model.config.n_experts)
        meshes = build_meshes(device, world, cfg.expert_parallel)
        if meshes.ep is not None:
            apply_expert_parallel(model, meshes.ep)
    elif cfg.expert_parallel != 1:
        raise UserError(f"config: parallel.expert_parallel = {cfg.expert_parallel} needs that many processes; "
                        "launch with torchrun --nproc_per_node N (world size 1 here)")
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        apply_compile(model)
    if meshes is not None:
        apply_fsdp(model, meshes, param_dtype, cfg.reshard_after_forward)
    return meshes


# ---- training-step helpers ------------------------------------------------------------------------------
def set_accumulating(model: nn.Module, accumulating: bool) -> None:
    """During gradient accumulation (not the last micro-batch): keep parameters gathered after backward and
    gradients unsharded and local, so the all-gather and reduce-scatter run once per step, not per micro-batch."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(not accumulating)
        model.set_reshard_after_backward(not accumulating)


def clip_grad_norm_(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip gradients to a global L2 norm and return the norm before clipping, as a tensor (no host sync).

    The same computation on one process and on many: sharded (DTensor) gradients, which may live on
    different meshes (dense on "dp", experts on ("efsdp", "ep")), are disjoint pieces on each rank, so the
    squared norm is the sum over ranks of the local squared sums (each in fp32). (`torch.nn.utils.
    clip_grad_norm_` cannot mix meshes, and its fp32 vector norm of a large embedding gradient is off by ~2e-5
    relative, which would make one process and many disagree.)
    """
    local = []
    for p in params:
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            if any(isinstance(pl, Replicate) for pl in g.placements):
                raise RuntimeError("clip_grad_norm_: replicated gradient shards are not supported")
            g = g.to_local()
        local.append(g)
    if not local:
        return torch.zeros(())
    sq = torch.stack([t.detach().float().pow(2).sum() for t in local]).sum()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sq)
    total = sq.double().sqrt()
    # Scale by min(1, max_norm / norm) on the device: a no-op factor of 1 when the norm is within bounds.
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(local, coef.to(local[0].dtype))
    return total
