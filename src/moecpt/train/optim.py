"""AdamW with weight decay on matrices only, and the warmup + decay learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from moecpt.config import OptimizerSection, ScheduleSection


def is_decayed(name: str, param: nn.Parameter) -> bool:
    """Weight decay applies to weight matrices; never to norms, biases or the router (`moe.gate`)."""
    return param.ndim >= 2 and ".moe.gate." not in f".{name}"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        (decay if is_decayed(name, p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: nn.Module, cfg: OptimizerSection, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        fused=device.type == "cuda" or None,
    )


def lr_at(step: int, total_steps: int, opt: OptimizerSection, sched: ScheduleSection) -> float:
    """Learning rate of optimizer step `step` (0-based).

    Linear warmup to `lr` over the first `warmup_steps` steps (step s uses lr * (s + 1) / warmup), then decay
    to `min_lr` at the last step: cosine (Swallow-MX), linear, or none (constant).
    """
    warm = sched.warmup_steps
    if step < warm:
        return opt.lr * (step + 1) / warm
    if sched.decay == "constant":
        return opt.lr
    span = max(1, total_steps - 1 - warm)
    progress = min(1.0, (step - warm) / span)
    if sched.decay == "linear":
        return opt.lr + (opt.min_lr - opt.lr) * progress
    return opt.min_lr + 0.5 * (opt.lr - opt.min_lr) * (1.0 + math.cos(math.pi * progress))
