"""AdamW construction and the learning-rate schedule (a pure function of the step, so resume is exact)."""
from __future__ import annotations

import math

import torch
from torch import nn

from kiln.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device, distributed: bool) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (norm gains are not decayed), in the kernel
    `fused_adamw` picks."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = fused_adamw(cfg.fused, device, distributed)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def fused_adamw(mode: bool | str, device: torch.device, distributed: bool) -> bool:
    """`optim.fused`: true/false as given (YAML reads on/off as those); `auto` takes the fused kernel
    where the device has one for these parameters (CUDA, sharded or not; CPU for a plain
    single-process model) and the foreach kernel otherwise (DTensor shards on CPU)."""
    if mode == "auto":
        return device.type == "cuda" or not distributed
    return mode is True


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warmup to cfg.lr, then cosine / linear / WSD decay to lr * min_lr_ratio (or constant)."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return peak
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.decay == "cosine":
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.decay == "linear":
        return peak - (peak - floor) * progress
    # wsd: warmup, stable at peak, then a linear cool-down over the last wsd_decay_fraction of training
    cool_start = 1.0 - cfg.wsd_decay_fraction
    if progress <= cool_start:
        return peak
    return peak - (peak - floor) * (progress - cool_start) / cfg.wsd_decay_fraction


def set_lr(optimizers: list, lr: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr
