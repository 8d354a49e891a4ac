"""What a checkpoint holds of a training run, and the contract the manager saves it through.

The manager (kiln.checkpoint.manager) owns directories, metadata, integrity and `latest`; what goes
into a checkpoint comes from a `Checkpointable`: every runtime (kiln.parallel.Runtime) is one, and
`ModelState` is the native implementation for plain model parts (pipeline stages, FSDP/TP shards or
a single module) with their optimizers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Protocol, runtime_checkable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
    set_optimizer_state_dict)

_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


@runtime_checkable
class Checkpointable(Protocol):
    """What the checkpoint manager needs of a run: tensors for DCP and/or files an engine writes itself."""

    engine_name: str  # recorded in meta.json; a checkpoint loads only into the engine that wrote it

    def state_dict(self, with_optimizer: bool = True) -> dict:
        """{"model": {fqn: tensor}, "optim": {...}} for DCP (layout-free names); {} when the engine keeps
        its whole state in its own files."""

    def load_state_dict(self, state: dict) -> None:
        """Put a state filled in by DCP back (the dict `state_dict` returned, now holding saved values)."""

    def save_files(self, directory: Path) -> None:
        """Write the engine's own files into `directory` (collective; nothing for the native engine)."""

    def load_files(self, directory: Path, with_optimizer: bool) -> None:
        """Read what `save_files` wrote (collective; nothing for the native engine)."""


def model_state(model_parts: list[nn.Module]) -> dict:
    """One flat {fqn: tensor} dict over all model parts held by this rank (names are layout-free)."""
    state = {}
    for part in model_parts:
        state.update(get_model_state_dict(part))
    return state


def optim_state(model_parts: list[nn.Module], optimizers: list) -> dict:
    state = {}
    for part, opt in zip(model_parts, optimizers):
        state.update(get_optimizer_state_dict(part, opt, options=_FLAT))
    return state


def load_model_state(model_parts: list[nn.Module], state: dict) -> None:
    for part in model_parts:
        keys = set(get_model_state_dict(part).keys())
        set_model_state_dict(part, {k: v for k, v in state.items() if k in keys})


class ModelState:
    """Model parts and (optionally) one optimizer per part, saved and restored through DCP."""

    engine_name = "native"

    def __init__(self, model_parts: list[nn.Module], optimizers: Optional[list] = None):
        self.model_parts = model_parts
        self.optimizers = optimizers or []

    def state_dict(self, with_optimizer: bool = True) -> dict:
        state = {"model": model_state(self.model_parts)}
        if with_optimizer and self.optimizers:
            state["optim"] = optim_state(self.model_parts, self.optimizers)
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        load_model_state(self.model_parts, state["model"])
        if "optim" in state:
            for part, opt in zip(self.model_parts, self.optimizers):
                set_optimizer_state_dict(part, opt, state["optim"], options=_FLAT)

    def save_files(self, directory: Path) -> None:
        pass

    def load_files(self, directory: Path, with_optimizer: bool) -> None:
        pass
