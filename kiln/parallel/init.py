"""Weight initialization for a parallel run (`parallel.init`, see `init_mode`).

- full: every rank materializes the whole model on CPU with the run's seed, then splits and shards
  it, so every layout starts from exactly the single-process weights. Costs the full fp32 model in
  host memory on every rank.
- sharded: the model stays on the meta device through splitting and sharding; each rank then
  allocates only its own shards on its device and initializes them (`init_sharded`). Memory is the
  shard, not the model; the values differ from the single-process init (same distributions).
"""
from __future__ import annotations

import contextlib
import hashlib

import torch
from torch import nn

from kiln.config import Config


def materialize(model: nn.Module, seed: int) -> nn.Module:
    """Allocate a meta-device model on CPU and initialize it from `seed`: the same weights the
    single-process run gets, whatever the layout (sharding comes after)."""
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    return model


# `parallel.init: auto` initializes the full model on every rank below this fp32 size (exact
# single-process weights, at most this much host memory per rank) and shards first above it.
FULL_INIT_MAX_BYTES = 2 * 2**30


def init_mode(cfg: Config) -> str:
    """`full` or `sharded`, resolving `auto` by the model's fp32 size. DeepSpeed always uses full."""
    from kiln.model.llama import count_params

    mode = cfg.parallel.init
    if cfg.parallel.engine == "deepspeed":  # config validation refuses deepspeed + sharded
        return "full"
    if cfg.model.moe is not None and cfg.parallel.tp > 1:  # TP replicates the router and experts: the
        return "full"  # per-(dp_shard, tp) seeds of sharded init would give each TP rank other weights
    if mode == "auto":
        return "full" if 4 * count_params(cfg.model) < FULL_INIT_MAX_BYTES else "sharded"
    return mode


def shard_seed(seed: int, stage: int, mesh) -> int:
    """The RNG seed for this rank's shards of pipeline stage `stage`: different for every
    (stage, dp_shard x cp, tp) coordinate, so distinct shards draw independent numbers, and the same
    across dp_replicate, whose ranks hold copies of one shard. Relies on every randomly
    initialized parameter being sharded over dp_shard x cp (FSDP's mesh) and tp (true for kiln's
    FSDP and TP plans; the replicated norm weights are constant)."""
    coord = (0, 0)
    if mesh is not None:
        cp = mesh["cp"].size()
        coord = (mesh["dp_shard"].get_local_rank() * cp + mesh["cp"].get_local_rank(), mesh["tp"].get_local_rank())
    digest = hashlib.sha256(f"kiln-init/{seed}/{stage}/{coord[0]}/{coord[1]}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextlib.contextmanager
def local_shards(module: nn.Module):
    """Temporarily swap every DTensor parameter for a plain parameter over its local shard (same
    storage), so in-place init writes this rank's shard with this rank's RNG on any device.
    (DTensor's own random ops coordinate ranks only on CUDA and broadcast rank 0's RNG state.)"""
    from torch.distributed.tensor import DTensor

    swapped = []
    for mod in module.modules():
        for key, p in list(mod._parameters.items()):
            if isinstance(p, DTensor):
                mod._parameters[key] = nn.Parameter(p.to_local(), requires_grad=False)
                swapped.append((mod, key, p))
    try:
        yield
    finally:
        for mod, key, p in swapped:
            mod._parameters[key] = p


@torch.no_grad()
def init_sharded(part: nn.Module, device: torch.device, seed: int) -> nn.Module:
    """Allocate a sharded meta-device model (or stage) on `device` and run its `init_weights` on
    the local shards only (the RoPE buffer is recomputed there too). The global RNG is left as
    it was."""
    part.to_empty(device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), local_shards(part):
        torch.manual_seed(seed)
        part.init_weights()
    return part


def on_meta(model: nn.Module) -> nn.Module:
    if not all(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        model.to_empty(device="meta")
    return model
