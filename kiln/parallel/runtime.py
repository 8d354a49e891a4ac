"""The native runtime: what the train loop sees of parallelism, whatever the layout.

`setup_parallel` builds the mesh, splits pipeline stages, applies `parallelize` and initializes the
weights (kiln.parallel.init). `ParallelRuntime` then runs forward+backward of one micro-batch (a whole
pipeline schedule under pp), clips by the global gradient norm, steps its optimizers, averages
scalars over DP and hands the checkpoint manager its state; it implements kiln.parallel.protocol.Runtime,
as the DeepSpeed runtime (kiln.parallel.deepspeed_engine) does.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from kiln.checkpoint.state import ModelState
from kiln.config import Config
from kiln.errors import KilnError
from kiln.distributed import ParallelDims, parallel_dims, pick_device
from kiln.model.loss import cross_entropy
from kiln.model.moe import set_aux_loss_scale
from kiln.parallel.init import init_mode, init_sharded, materialize, on_meta, shard_seed
from kiln.parallel.mesh import build_mesh, dp_coordinate
from kiln.parallel.parallelize import data_parallel_mesh, mixed_precision_dtype, parallelize
from kiln.parallel.pipeline import build_schedule, split_stage, stage_indices


def _full_value(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


class ParallelRuntime:
    """Native PyTorch runtime (DTensor TP/SP, FSDP2/HSDP, torch.distributed.pipelining)."""

    engine_name = "native"

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
        self.cp = dims.cp if dims else 1
        self.cp_rank = mesh["cp"].get_local_rank() if mesh is not None else 0
        self.dp_rank = dp_coordinate(mesh, dims) if mesh is not None else 0
        self.dp_size = dims.dp if dims else 1
        dtype = mixed_precision_dtype(cfg, device)
        # FSDP casts parameters itself; without it, bf16 compute comes from autocast.
        self._autocast = dtype if dtype != torch.float32 and data_parallel_mesh(mesh) is None else None
        self._mb_losses: list[torch.Tensor] = []
        self._mb_scale = 1.0
        self.optimizers: list = []

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
        if self.cp > 1:  # every cp rank gets the whole sample and keeps its load-balanced chunks
            from kiln.parallel.context import shard_sequence

            if doc is not None:
                raise KilnError("data.document_mask: document masks are not supported with parallel.cp > 1")
            inp, tgt = shard_sequence(inp, self.cp, self.cp_rank), shard_sequence(tgt, self.cp, self.cp_rank)
        return inp, tgt, (None if doc is None else doc.to(self.device, non_blocking=True))

    def _pipeline_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = cross_entropy(output, target)
        self._mb_losses.append(_full_value(loss.detach()))
        return loss * self._mb_scale

    def _run_schedule(self, batch: dict, loss_scale: float, train: bool) -> torch.Tensor | None:
        inp, tgt, doc = self._inputs(batch)
        self._mb_losses = []
        self._mb_scale = loss_scale / self.dims.microbatches
        for part in self.model_parts:  # MoE aux losses take the scale each micro-batch's loss gets
            set_aux_loss_scale(part, self._mb_scale)
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
        set_aux_loss_scale(self.model_parts[0], loss_scale)
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
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global L2 norm over every shard on every rank, then scale grads if it exceeds max_norm
        (max_norm <= 0: measure only). DTensor grads are reduced per (mesh, placements) group;
        pipeline stages hold disjoint parameters, so their squares add over the pp group. Stays on
        the device: the scale is a clamped tensor, as in torch.nn.utils.clip_grad_norm_."""
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
        total = squares.sqrt()
        if max_norm > 0:
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0).float()
            for grads in groups.values():
                torch._foreach_mul_(grads, coef)
        return total

    def reduce_mean(self, value: Optional[torch.Tensor]) -> torch.Tensor:
        """Average a per-replica scalar over DP; only last-stage ranks contribute (each TP peer
        holds the same value, so the sum is divided by tp as well; each CP rank holds the mean over
        its equal share of the tokens, so dividing by cp gives the mean over the sequence)."""
        if self.mesh is None:
            return value.detach().double()
        own = value.detach().double().reshape(1) if (self.is_last_stage and value is not None) else None
        t = own if own is not None else torch.zeros(1, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t[0] / (self.dp_size * self.tp * self.cp)

    def all_finite(self, loss: Optional[torch.Tensor], grad_norm: torch.Tensor) -> torch.Tensor:
        """The global gradient norm is the same on every rank (gradients are reduced before it), and a
        non-finite loss anywhere makes it non-finite: one device op, no collective."""
        return torch.isfinite(grad_norm)

    def optimizer_step(self) -> None:
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    def build_optimizers(self, make: Callable[[nn.Module], torch.optim.Optimizer]) -> list:
        """One optimizer per model part (pipeline stages on this rank)."""
        self.optimizers = [make(part) for part in self.model_parts]
        return self.optimizers

    # -- checkpoints: DCP state of the parts and their optimizers ------------------------------
    def state_dict(self, with_optimizer: bool = True) -> dict:
        return ModelState(self.model_parts, self.optimizers).state_dict(with_optimizer)

    def load_state_dict(self, state: dict) -> None:
        ModelState(self.model_parts, self.optimizers).load_state_dict(state)

    def save_files(self, directory: Path) -> None:
        pass

    def load_files(self, directory: Path, with_optimizer: bool) -> None:
        pass


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
        on_meta(model)
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
