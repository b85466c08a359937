"""AdamW with weight decay on matrices only. The learning-rate schedules are in moecpt.train.schedule
(`lr_at` is importable from here too)."""

from __future__ import annotations

import torch
from torch import nn

from moecpt.config import OptimizerSection
from moecpt.train.schedule import lr_at

__all__ = ["build_optimizer", "is_decayed", "lr_at", "param_groups"]


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
