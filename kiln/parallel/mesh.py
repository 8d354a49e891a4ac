"""The DeviceMesh for a job's parallel dims (kiln.distributed.dims).

A 4-D mesh with named dims pp, dp_replicate, dp_shard, tp (tp innermost, so tensor-parallel peers
are neighbouring ranks, i.e. on the same node); size-1 dims are kept so `mesh["tp"]` always exists.
With expert parallelism dp_shard is built as expert_dp x ep (ep inner, so expert-parallel peers are
neighbours) and flattened back into `dp_shard`, which keeps its rank order.
"""
from __future__ import annotations

import torch

from kiln.distributed.dims import DIM_NAMES, ParallelDims


def build_mesh(dims: ParallelDims, device: torch.device):
    """The 4-D mesh (size-1 dims included, so `mesh["tp"]` always exists)."""
    from torch.distributed.device_mesh import init_device_mesh

    if dims.ep == 1:
        shape = (dims.pp, dims.dp_replicate, dims.dp_shard, dims.tp)
        return init_device_mesh(device.type, shape, mesh_dim_names=DIM_NAMES)
    shape = (dims.pp, dims.dp_replicate, dims.dp_shard // dims.ep, dims.ep, dims.tp)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=("pp", "dp_replicate", "expert_dp", "ep", "tp"))
    mesh["expert_dp", "ep"]._flatten("dp_shard")
    return mesh


def dp_coordinate(mesh, dims: ParallelDims) -> int:
    """This rank's index among DP replicas: TP and PP peers of one replica share it."""
    return mesh["dp_replicate"].get_local_rank() * dims.dp_shard + mesh["dp_shard"].get_local_rank()
