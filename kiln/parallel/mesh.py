"""Parallel dims: every mesh dimension derived from the config and world size, validated up front.

`check_layout(cfg, world_size)` raises `ConfigError` for impossible layouts before any process
group exists (call it from the launcher and from `kiln train` before `init_process_group`);
`build_mesh` then creates a 4-D `DeviceMesh` with named dims pp, dp_replicate, dp_shard, tp
(tp innermost, so tensor-parallel peers are neighbouring ranks, i.e. on the same node).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.config import Config, grad_accum_steps, pipeline_microbatches, resolve_world, validate
from kiln.errors import ConfigError

DIM_NAMES = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class ParallelDims:
    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int
    virtual_stages: int
    microbatches: int

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual_stages


def check_layout(cfg: Config, world_size: int) -> ParallelDims:
    """Resolve the mesh for `world_size`; raise ConfigError. The model/batch/schedule rules were
    already checked when the config was loaded (kiln.config._validate_layout); checking again here
    covers a Config built or edited in code."""
    if world_size < 1:
        raise ConfigError("parallel", f"world size must be >= 1, got {world_size}")
    validate(cfg)
    dims = resolve_world(cfg, world_size)
    grad_accum_steps(cfg, dims["dp_replicate"] * dims["dp_shard"])  # global batch must split over DP
    p = cfg.parallel
    return ParallelDims(pp=p.pp, dp_replicate=dims["dp_replicate"], dp_shard=dims["dp_shard"], tp=p.tp,
                        virtual_stages=p.pp_virtual_stages if p.pp > 1 else 1,
                        microbatches=pipeline_microbatches(cfg))


def build_mesh(dims: ParallelDims, device: torch.device):
    """The 4-D mesh (size-1 dims included, so `mesh["tp"]` always exists)."""
    from torch.distributed.device_mesh import init_device_mesh

    shape = (dims.pp, dims.dp_replicate, dims.dp_shard, dims.tp)
    return init_device_mesh(device.type, shape, mesh_dim_names=DIM_NAMES)


def dp_coordinate(mesh, dims: ParallelDims) -> int:
    """This rank's index among DP replicas: TP and PP peers of one replica share it."""
    return mesh["dp_replicate"].get_local_rank() * dims.dp_shard + mesh["dp_shard"].get_local_rank()
