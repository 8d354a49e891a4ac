"""The Runtime interface: everything the train loop and the checkpoint manager ask of parallelism.

Two implementations: the native one (kiln.parallel.runtime.ParallelRuntime: DTensor TP/SP, FSDP2/HSDP,
pipelining) and DeepSpeed's (kiln.parallel.deepspeed_engine.DeepSpeedRuntime). The loop never asks
which one it has.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Runtime(Protocol):
    model_parts: list[nn.Module]  # this rank's model (pipeline stages: one part per local stage)
    optimizers: list  # built by build_optimizers; one per part (DeepSpeed: its wrapped optimizer)
    device: torch.device
    dp_rank: int  # this rank's data-parallel replica index: which batches it reads
    dp_size: int
    engine_name: str  # "native" | "deepspeed", recorded in checkpoints

    def build_optimizers(self, make: Callable[[nn.Module], torch.optim.Optimizer]) -> list:
        """Create (and keep) the optimizers; returns them so the caller can set their learning rate."""

    def forward_backward(self, batch: dict, loss_scale: float) -> Optional[torch.Tensor]:
        """Loss of one micro-batch, gradients accumulated with `loss_scale`; a 0-d tensor on the device
        (None on ranks that hold no loss: pipeline stages before the last)."""

    def eval_loss(self, batch: dict) -> Optional[torch.Tensor]:
        """Loss of one batch without gradients (None where forward_backward gives None)."""

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global gradient L2 norm over every rank (a 0-d tensor on the device, no host sync), scaling the
        gradients when it exceeds max_norm (max_norm <= 0: measure only)."""

    def all_finite(self, loss: Optional[torch.Tensor], grad_norm: torch.Tensor) -> torch.Tensor:
        """A device bool, equal on every rank, false when this step must not reach the optimizer."""

    def optimizer_step(self) -> None:
        """Step every optimizer and clear the gradients."""

    def reduce_mean(self, values: Optional[torch.Tensor]) -> torch.Tensor:
        """Mean over DP replicas of per-replica values (any shape; None on ranks that hold none): one
        collective, result on the device."""

    # -- checkpoints (kiln.checkpoint.state.Checkpointable) -------------------------------------
    def state_dict(self, with_optimizer: bool = True) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def save_files(self, directory: Path) -> None: ...

    def load_files(self, directory: Path, with_optimizer: bool) -> None: ...
