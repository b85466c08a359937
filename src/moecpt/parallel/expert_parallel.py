"""Expert parallelism: each MoE layer's experts split over an expert-parallel (EP) group of ranks.

The single-device `SparseMoeBlock` routes and sorts its rows by expert, then calls `experts(x_NH, offs_E)`.
Under EP that call becomes dispatch -> local experts -> combine:

1. the per-expert row counts are exchanged (one equal-split all-to-all), so every rank knows how many rows it
   sends to and receives from each EP peer;
2. rows go to the rank that owns their expert (all-to-all with variable splits; rank j owns experts
   [j * E/ep, (j + 1) * E/ep));
3. the received rows, grouped by source rank, are regrouped by local expert and run as one grouped GEMM;
4. the outputs return the same way (the inverse all-to-all), in the order the block sent them.

An `Experts` subclass with more tensors per expert (gpt-oss: biases, its own activation) defines
`grouped(x, offs, **its parameters)`; step 3 calls it with this rank's slices of every parameter.

Dropless: every routed row is computed. A rank whose experts receive no rows still takes part in both
all-to-alls (with zero-length splits) and in backward, so nothing waits on it: the collectives run the same
number of times on every rank whatever the routing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from moecpt.model.moe import Experts, gather_rows, inverse_permutation, swiglu_experts


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; its gradient is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Send rows in_splits[j] of `x` to rank j of `group`, receive out_splits[j] rows from rank j (autograd)."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class ExpertParallelExperts(Experts):
    """`Experts` whose weights hold this rank's experts only (DTensors sharded on dim 0 over the EP mesh).

    Installed by `apply_expert_parallel` by swapping the class of an existing `Experts` module, so parameter
    names (and therefore checkpoints) are the same as on one device.
    """

    ep_group: dist.ProcessGroup
    ep_size: int

    def forward(self, x_NH: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        ep = self.ep_size
        local = {name: _local(p) for name, p in self._parameters.items()}
        E_local = local["gate_up_proj"].shape[0]
        counts_E = torch.diff(offs_E.long(), prepend=offs_E.new_zeros(1).long())
        # recv[j, l]: rows rank j sends to my local expert l.
        recv_counts = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts, counts_E, group=self.ep_group)
        send_JL, recv_JL = counts_E.view(ep, E_local), recv_counts.view(ep, E_local)
        in_splits = send_JL.sum(1).tolist()
        out_splits = recv_JL.sum(1).tolist()
        x_recv = all_to_all(x_NH, out_splits, in_splits, self.ep_group)

        # Received rows are ordered (source rank, local expert); the grouped GEMM wants (local expert, rank).
        key_JL = torch.arange(E_local * ep, device=x_NH.device).view(E_local, ep).t()  # [j, l] -> l * ep + j
        key = torch.repeat_interleave(key_JL.reshape(-1), recv_JL.reshape(-1), output_size=x_recv.shape[0])
        order = torch.argsort(key, stable=True)
        offs_local = recv_JL.sum(0).cumsum(0).to(torch.int32)
        inv = inverse_permutation(order)
        x_sorted = gather_rows(x_recv, order, inv, 1)
        if hasattr(self, "grouped"):  # experts with more than the two matrices (gpt-oss)
            y_sorted = self.grouped(x_sorted, offs_local, **local)
        else:
            y_sorted = swiglu_experts(x_sorted, local["gate_up_proj"], local["down_proj"], offs_local, self.fused)
        y_recv = gather_rows(y_sorted, inv, order, 1)
        return all_to_all(y_recv, in_splits, out_splits, self.ep_group)


def apply_expert_parallel(model: torch.nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard every `Experts` module of `model` (subclasses too) over `ep_mesh` (dim 0 = experts, every
    parameter) and switch it to dispatch/combine.

    The parameters become DTensors with placement Shard(0) on `ep_mesh`; a checkpoint therefore records
    their global shape and loads at any other EP size or on one device.
    """
    ep = ep_mesh.size()
    for module in model.modules():
        if not isinstance(module, Experts) or isinstance(module, ExpertParallelExperts):
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if param.shape[0] % ep:
                raise ValueError(f"{param.shape[0]} experts cannot be split over {ep} ranks")
            local = distribute_tensor(param.data, ep_mesh, [Shard(0)], src_data_rank=None)
            module.register_parameter(name, torch.nn.Parameter(local, requires_grad=param.requires_grad))
        module.__class__ = expert_parallel_class(type(module))
        module.ep_group = ep_mesh.get_group()
        module.ep_size = ep


_EP_CLASSES: dict[type, type] = {Experts: ExpertParallelExperts}


def expert_parallel_class(cls: type) -> type:
    """The dispatch/combine version of an `Experts` class: `ExpertParallelExperts` for `Experts`, a subclass of
    both for a family's own experts (its `grouped` runs the local experts)."""
    if cls not in _EP_CLASSES:
        _EP_CLASSES[cls] = type(f"ExpertParallel{cls.__name__}", (ExpertParallelExperts, cls), {})
    return _EP_CLASSES[cls]
