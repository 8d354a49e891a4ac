"""The training loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy in fp32 (vocab-sharded logits work under `loss_parallel`)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())
