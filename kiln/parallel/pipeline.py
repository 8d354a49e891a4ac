"""Pipeline parallel: split a kiln Transformer into stages and run a `torch.distributed.pipelining`
schedule over them.

Stages are balanced by layer count (embedding on the first, norm and output on the last; when
layers do not divide evenly the extra layers go to the middle stages, which carry neither).
With virtual stages, rank r holds stages r, r+pp, r+2pp, ... (the loop placement that the
interleaved schedules expect). Each stage is a copy of the model's structure with the other
layers deleted, so parameter names are those of the full model. The copy never duplicates weights:
a meta-device model is copied as is (cheap), a materialized one shares its tensors with the stage.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

# torch.distributed.pipelining's class for each of kiln.config.PP_SCHEDULES (the config checks the name).
SCHEDULES = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved_1f1b": "ScheduleInterleaved1F1B",
    "zero_bubble": "ScheduleInterleavedZeroBubble",
}


def layers_per_stage(n_layers: int, num_stages: int) -> list[int]:
    """Even split; the remainder goes to the stages furthest from both ends."""
    counts = [n_layers // num_stages] * num_stages
    middle_first = sorted(range(num_stages), key=lambda s: -min(s, num_stages - 1 - s))
    for s in middle_first[: n_layers % num_stages]:
        counts[s] += 1
    return counts


def stage_indices(pp_rank: int, pp: int, virtual_stages: int) -> list[int]:
    return [pp_rank + v * pp for v in range(virtual_stages)]


def _skeleton(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters and buffers are on the meta device (no storage)."""
    memo: dict = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in memo:
            meta = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _share_tensors(part: nn.Module, model: nn.Module) -> None:
    """Point every parameter and buffer of `part` at the same-named tensor of `model`."""
    source = dict(model.named_modules())
    for name, module in part.named_modules():
        for key in module._parameters:
            if module._parameters[key] is not None:
                module._parameters[key] = source[name]._parameters[key]
        for key in module._buffers:
            if module._buffers[key] is not None:
                module._buffers[key] = source[name]._buffers[key]


def split_stage(model: nn.Module, stage: int, num_stages: int) -> nn.Module:
    """`model` restricted to stage `stage`'s layers (and ends). A materialized model's tensors are
    shared with the stage, not copied; a meta model gives a meta stage."""
    counts = layers_per_stage(len(model.layers), num_stages)
    start = sum(counts[:stage])
    keep = {str(i) for i in range(start, start + counts[stage])}
    part = _skeleton(model)
    for name in list(part.layers.keys()):
        if name not in keep:
            del part.layers[name]
    if stage != 0:
        part.tok_embeddings = None
    if stage != num_stages - 1:
        part.norm = None
        part.output = None
    if not all(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        _share_tensors(part, model)
    return part


def build_schedule(name: str, parts: list[nn.Module], stages: list[int], num_stages: int, device: torch.device,
                   pp_group, microbatches: int, loss_fn):
    """A schedule over this rank's stages. Gradients are not rescaled by the schedule
    (`scale_grads=False`): `loss_fn` already divides by the micro-batch count, which keeps
    accumulation across several `step` calls correct."""
    from torch.distributed import pipelining

    pipe_stages = [pipelining.PipelineStage(part, idx, num_stages, device, group=pp_group)
                   for part, idx in zip(parts, stages)]
    cls = getattr(pipelining.schedules, SCHEDULES[name])
    if len(pipe_stages) == 1 and name in ("gpipe", "1f1b"):
        return cls(pipe_stages[0], n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(pipe_stages, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
