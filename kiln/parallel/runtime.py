"""Single-process ParallelRuntime (placeholder until the full mesh runtime lands)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())


class ParallelRuntime:
    def __init__(self, model: nn.Module, device: torch.device):
        self.mesh = None
        self.model_parts = [model]
        self.device = device
        self.dp_rank, self.dp_size = 0, 1
        self.is_last_stage = True

    def _forward(self, batch):
        model = self.model_parts[0]
        doc_ids = batch.get("doc_ids")
        logits = model(batch["input"].to(self.device), None if doc_ids is None else doc_ids.to(self.device))
        return cross_entropy(logits, batch["target"].to(self.device))

    def forward_backward(self, batch, loss_scale):
        loss = self._forward(batch)
        (loss * loss_scale).backward()
        return loss.detach()

    @torch.no_grad()
    def eval_loss(self, batch):
        return self._forward(batch)

    def clip_grad_norm_(self, max_norm):
        params = [p for m in self.model_parts for p in m.parameters()]
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")))

    def reduce_mean(self, value):
        return float("nan") if value is None else float(value)

    def optimizer_step(self, optimizers):
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)


def setup_parallel(cfg, model, world_size: int, rank: int) -> ParallelRuntime:
    device = pick_device(cfg.train.device)
    return ParallelRuntime(model.to(device), device)
