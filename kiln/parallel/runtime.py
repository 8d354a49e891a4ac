"""ParallelRuntime: what the train loop sees of parallelism, whatever the layout.

`setup_parallel` builds the mesh, splits pipeline stages, applies `parallelize` and initializes
the weights in one of two ways (`parallel.init`, see `init_mode`):
- full: every rank materializes the whole model on CPU with the run's seed, then splits and shards
  it, so every layout starts from exactly the single-process weights. Costs the full fp32 model in
  host memory on every rank.
- sharded: the model stays on the meta device through splitting and sharding; each rank then
  allocates only its own shards on its device and initializes them (`init_sharded`). Memory is the
  shard, not the model; the values differ from the single-process init (same distributions).
The runtime then runs forward+backward of one micro-batch (a whole pipeline schedule under pp),
clips by the global gradient norm and averages scalars over DP. The DeepSpeed engine provides the
same interface (kiln.parallel.deepspeed_engine).
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kiln.config import Config
from kiln.errors import ConfigError
from kiln.distributed import ParallelDims, parallel_dims, pick_device
from kiln.parallel.mesh import build_mesh, dp_coordinate
from kiln.parallel.parallelize import data_parallel_mesh, mixed_precision_dtype, parallelize
from kiln.parallel.pipeline import build_schedule, split_stage, stage_indices


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy in fp32 (vocab-sharded logits work under `loss_parallel`)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())


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
    if mode == "auto":
        return "full" if 4 * count_params(cfg.model) < FULL_INIT_MAX_BYTES else "sharded"
    return mode


def shard_seed(seed: int, stage: int, mesh) -> int:
    """The RNG seed for this rank's shards of pipeline stage `stage`: different for every
    (stage, dp_shard, tp) coordinate, so distinct shards draw independent numbers, and the same
    across dp_replicate, whose ranks hold copies of one shard. Relies on every randomly
    initialized parameter being sharded over dp_shard and tp (true for kiln's FSDP and TP plans;
    the replicated norm weights are constant)."""
    coord = (mesh["dp_shard"].get_local_rank(), mesh["tp"].get_local_rank()) if mesh is not None else (0, 0)
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


def _on_meta(model: nn.Module) -> nn.Module:
    if not all(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        model.to_empty(device="meta")
    return model


def _full_value(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


class ParallelRuntime:
    """Native PyTorch runtime (DTensor TP/SP, FSDP2/HSDP, torch.distributed.pipelining)."""

    def __init__(self, cfg: Config, model_parts: list[nn.Module], device: torch.device, mesh=None,
                 dims: ParallelDims | None = None, schedule=None, stages: tuple[int, ...] = (0,)):
        self.cfg = cfg
        self.mesh = mesh
        self.dims = dims
        self.model_parts = model_parts
        self.device = device
        self.schedule = schedule
        self.stages = stages
        num_stages = dims.num_stages if dims else 1
        self.has_first_stage = 0 in stages
        self.is_last_stage = (num_stages - 1) in stages
        self.tp = dims.tp if dims else 1
        self.dp_rank = dp_coordinate(mesh, dims) if mesh is not None else 0
        self.dp_size = dims.dp if dims else 1
        dtype = mixed_precision_dtype(cfg, device)
        # FSDP casts parameters itself; without it, bf16 compute comes from autocast.
        self._autocast = dtype if dtype != torch.float32 and data_parallel_mesh(mesh) is None else None
        self._mb_losses: list[torch.Tensor] = []
        self._mb_scale = 1.0

    # -- forward/backward ---------------------------------------------------------------------
    def _context(self):
        stack = contextlib.ExitStack()
        if self.tp > 1:
            from torch.distributed.tensor.parallel import loss_parallel

            stack.enter_context(loss_parallel())
        if self._autocast is not None:
            stack.enter_context(torch.autocast(self.device.type, dtype=self._autocast))
        return stack

    def _inputs(self, batch: dict):
        inp = batch["input"].to(self.device, non_blocking=True)
        tgt = batch["target"].to(self.device, non_blocking=True)
        doc = batch.get("doc_ids")
        return inp, tgt, (None if doc is None else doc.to(self.device, non_blocking=True))

    def _pipeline_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = cross_entropy(output, target)
        self._mb_losses.append(_full_value(loss.detach()))
        return loss * self._mb_scale

    def _run_schedule(self, batch: dict, loss_scale: float, train: bool) -> torch.Tensor | None:
        inp, tgt, doc = self._inputs(batch)
        self._mb_losses = []
        self._mb_scale = loss_scale / self.dims.microbatches
        args = (inp,) if self.has_first_stage else ()
        kwargs = {"doc_ids": doc} if doc is not None else {}
        target = tgt if self.is_last_stage else None
        with self._context():
            if train:
                self.schedule.step(*args, target=target, return_outputs=False, **kwargs)
            else:
                self.schedule.eval(*args, target=target, **kwargs)
        if not self.is_last_stage:
            return None
        # The first step also calls the loss during shape inference: keep the real micro-batches.
        return torch.stack(self._mb_losses[-self.dims.microbatches:]).mean()

    def forward_backward(self, batch: dict, loss_scale: float) -> torch.Tensor | None:
        if self.schedule is not None:
            return self._run_schedule(batch, loss_scale, train=True)
        inp, tgt, doc = self._inputs(batch)
        with self._context():
            loss = cross_entropy(self.model_parts[0](inp, doc), tgt)
            (loss * loss_scale).backward()
        return _full_value(loss.detach())

    @torch.no_grad()
    def eval_loss(self, batch: dict) -> torch.Tensor | None:
        if self.schedule is not None:
            return self._run_schedule(batch, 1.0, train=False)
        inp, tgt, doc = self._inputs(batch)
        with self._context():
            return _full_value(cross_entropy(self.model_parts[0](inp, doc), tgt))

    # -- gradients and scalars ----------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        return [p for part in self.model_parts for p in part.parameters()]

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """Global L2 norm over every shard on every rank, then scale grads if it exceeds max_norm
        (max_norm <= 0: measure only). DTensor grads are reduced per (mesh, placements) group;
        pipeline stages hold disjoint parameters, so their squares add over the pp group."""
        from torch.distributed.tensor import DTensor

        groups: dict = {}
        for p in self.parameters():
            if p.grad is not None:
                key = (p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else None
                groups.setdefault(key, []).append(p.grad)
        squares = torch.zeros((), dtype=torch.float64, device=self.device)
        for grads in groups.values():
            norm = _full_value(torch.nn.utils.get_total_norm(grads, 2.0))
            squares += norm.double().to(self.device) ** 2
        if self.mesh is not None and self.dims.pp > 1:
            dist.all_reduce(squares, group=self.mesh["pp"].get_group())
        total = math.sqrt(float(squares))
        if max_norm > 0 and total > max_norm:
            coef = max_norm / (total + 1e-6)
            for grads in groups.values():
                torch._foreach_mul_(grads, coef)
        return total

    def reduce_mean(self, value: float | None) -> float:
        """Average a per-replica scalar over DP; only last-stage ranks contribute (each TP peer
        holds the same value, so the sum is divided by tp as well)."""
        if self.mesh is None:
            return float(value)
        own = float(value) if (self.is_last_stage and value is not None) else 0.0
        t = torch.tensor([own], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / (self.dp_size * self.tp)

    def optimizer_step(self, optimizers: list) -> None:
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    def build_optimizers(self, make: Callable[[nn.Module], torch.optim.Optimizer]) -> list:
        """One optimizer per model part (pipeline stages on this rank)."""
        return [make(part) for part in self.model_parts]


def setup_parallel(cfg: Config, model: nn.Module, world_size: int, rank: int) -> ParallelRuntime:
    """Mesh, pipeline split, parallelize and weight init (full or sharded); see the module docstring.
    `model` should be built on the meta device; setup_parallel allocates it."""
    if cfg.parallel.engine == "deepspeed":
        from kiln.parallel.deepspeed_engine import setup_deepspeed

        return setup_deepspeed(cfg, model, world_size, rank)
    dims = parallel_dims(cfg, world_size)
    device = pick_device(cfg.train.device, rank)
    sharded = init_mode(cfg) == "sharded"
    if sharded:
        _on_meta(model)
    else:
        materialize(model, cfg.train.seed)
    if world_size == 1:
        if sharded:  # nothing to shard: initialize straight on the device
            init_sharded(model, device, cfg.train.seed)
        return ParallelRuntime(cfg, [parallelize(model.to(device), None, cfg, device)], device)
    mesh = build_mesh(dims, device)
    if dims.pp == 1:
        parts, stages = [model], (0,)
    else:
        stages = tuple(stage_indices(mesh["pp"].get_local_rank(), dims.pp, dims.virtual_stages))
        parts = [split_stage(model, s, dims.num_stages) for s in stages]
        del model
    if sharded:
        parts = [init_sharded(parallelize(part, mesh, cfg, device), device, shard_seed(cfg.train.seed, s, mesh))
                 for part, s in zip(parts, stages)]
    else:
        parts = [parallelize(part.to(device), mesh, cfg, device) for part in parts]
    runtime = ParallelRuntime(cfg, parts, device, mesh, dims, stages=stages)
    if dims.pp > 1:
        runtime.schedule = build_schedule(cfg.parallel.pp_schedule, parts, list(stages), dims.num_stages, device,
                                          mesh["pp"].get_group(), dims.microbatches, runtime._pipeline_loss)
    return runtime
