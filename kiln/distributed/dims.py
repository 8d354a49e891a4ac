"""Parallel dims: every mesh dimension derived from the config and world size, validated up front.

`parallel_dims(cfg, world_size)` raises `ConfigError` for impossible layouts before any process group
exists (the launcher, `kiln submit` and `kiln train` call it before `init_process_group`);
kiln.parallel.mesh then builds the DeviceMesh from these dims.
"""
from __future__ import annotations

from dataclasses import dataclass

from kiln.batch_ramp import batch_ramp
from kiln.config import Config, grad_accum_steps, pipeline_microbatches, resolve_world, validate
from kiln.errors import ConfigError

DIM_NAMES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int
    virtual_stages: int
    microbatches: int
    cp: int = 1  # context parallel: ranks that split one sequence (they see the same batch)
    ep: int = 1  # expert parallel: a split of dp_shard (dp_shard = ep * the experts' own FSDP degree)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual_stages


def parallel_dims(cfg: Config, world_size: int) -> ParallelDims:
    """Resolve the mesh for `world_size`; raise ConfigError. The model/batch/schedule rules were
    already checked when the config was loaded (kiln.config._validate_layout); checking again here
    covers a Config built or edited in code."""
    if world_size < 1:
        raise ConfigError("parallel", f"world size must be >= 1, got {world_size}")
    validate(cfg)
    dims = resolve_world(cfg, world_size)
    grad_accum_steps(cfg, dims["dp_replicate"] * dims["dp_shard"])  # global batch must split over DP
    batch_ramp(cfg, dims["dp_replicate"] * dims["dp_shard"])  # and so must the ramp's first batch
    p = cfg.parallel
    return ParallelDims(pp=p.pp, dp_replicate=dims["dp_replicate"], dp_shard=dims["dp_shard"], tp=p.tp, cp=p.cp,
                        virtual_stages=p.pp_virtual_stages if p.pp > 1 else 1,
                        microbatches=pipeline_microbatches(cfg), ep=p.ep)
