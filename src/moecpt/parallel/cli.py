"""`moecpt plan`: per-GPU memory of the possible training layouts before queueing a job."""

from __future__ import annotations

import argparse
from pathlib import Path

from moecpt.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="per-GPU memory of each sharding layout, and the largest micro-batch that fits",
        description="Estimate per-GPU memory (parameters, gradients, optimizer state, gathered weights, "
                    "activations) of a training config under each layout (expert parallel size, reshard after "
                    "forward, activation checkpointing) on N GPUs, and the largest micro-batch that fits. "
                    "Settings come from --config, overridable as --section.key=value.")
    p.add_argument("--config", help="training TOML file (see configs/)")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (world size)")
    p.add_argument("--gpu-memory", default="80GB", help="memory of one GPU, e.g. 80GB, 40GB, 141GB, 80GiB")
    p.add_argument("--reserve", type=float, default=0.1,
                   help="fraction of GPU memory left for CUDA context, fragmentation and buffers (default 0.1)")
    p.set_defaults(func=_plan, accepts_overrides=True)


def _model_config(cfg):
    from moecpt.train.setup import model_config

    if cfg.init_from and not Path(cfg.init_from).exists():
        print(f"note: init_from {cfg.init_from} is not here; using model.preset {cfg.model.preset!r}")
        cfg.init_from = ""
    return model_config(cfg)


def _plan(args: argparse.Namespace) -> int:
    from moecpt.config import load_config
    from moecpt.parallel.plan import candidate_layouts, format_plan, parse_memory, plan_memory

    if args.gpus < 1:
        raise UserError("--gpus must be >= 1")
    if not 0 <= args.reserve < 1:
        raise UserError("--reserve must be in [0, 1)")
    try:
        memory = parse_memory(args.gpu_memory)
    except ValueError:
        raise UserError(f"--gpu-memory {args.gpu_memory!r}: write e.g. 80GB") from None
    cfg = load_config(args.config, args.overrides)
    c = _model_config(cfg)
    dtype_bytes = 4 if cfg.training.dtype == "float32" else 2
    t = cfg.training
    plans = [plan_memory(c, lay, cfg.data.seq_len, memory, args.reserve)
             for lay in candidate_layouts(c, args.gpus, dtype_bytes)]
    print(format_plan(c, plans, cfg.data.seq_len, t.global_batch))
    return 0
