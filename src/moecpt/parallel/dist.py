"""Process-group setup from the environment `torchrun` (or `srun torchrun`) exports, and teardown."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from moecpt.errors import UserError


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when started as a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def init_distributed(device: torch.device, backend: str = "auto", timeout_s: int = 1800) -> bool:
    """Initialise the default process group when launched by torchrun with WORLD_SIZE > 1.

    Returns True if this call created the group (the caller then owns its teardown). `backend` "auto" picks
    NCCL for CUDA devices and gloo for CPU. A group that already exists (a test harness, a notebook) is used
    as it is.
    """
    if is_initialized() or launched_world_size() <= 1:
        return False
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: launch with "
                        "torchrun (or srun torchrun), which sets them")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise UserError("parallel.backend = 'nccl' needs CUDA devices; use gloo (or auto) on CPU")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    return True


def destroy_distributed() -> None:
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (nothing on one process)."""
    if is_initialized():
        dist.barrier()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or "max") `t` over ranks in place (nothing on one process); returns `t`."""
    if is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def new_group(backend: str = "gloo"):
    """A process group of all ranks beside the default one (every rank calls this, in the same order); None on
    one process. Background work (an asynchronous checkpoint) runs its collectives there, never interleaved
    with training's."""
    return dist.new_group(backend=backend) if is_initialized() else None
