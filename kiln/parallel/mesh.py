"""The DeviceMesh for a job's parallel dims (kiln.distributed.dims).

A 5-D mesh with named dims pp, dp_replicate, dp_shard, cp, tp (tp innermost, so tensor-parallel peers
are neighbouring ranks, i.e. on the same node, and context-parallel rings next to them); size-1 dims
are kept so `mesh["tp"]` and `mesh["cp"]` always exist.
With expert parallelism dp_shard is built as expert_dp x ep (ep inner, so expert-parallel peers are
neighbours) and flattened back into `dp_shard`, which keeps its rank order.
"""
from __future__ import annotations

import torch

from kiln.distributed.dims import DIM_NAMES, ParallelDims


def build_mesh(dims: ParallelDims, device: torch.device):
    """The 5-D mesh (size-1 dims included, so `mesh["tp"]` always exists)."""
    from torch.distributed.device_mesh import init_device_mesh

    if dims.ep == 1:
        shape = (dims.pp, dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp)
        return init_device_mesh(device.type, shape, mesh_dim_names=DIM_NAMES)
    shape = (dims.pp, dims.dp_replicate, dims.dp_shard // dims.ep, dims.ep, dims.cp, dims.tp)
    names = ("pp", "dp_replicate", "expert_dp", "ep", "cp", "tp")
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)
    mesh["expert_dp", "ep"]._flatten("dp_shard")
    return mesh


def dp_coordinate(mesh, dims: ParallelDims) -> int:
    """This rank's index among DP replicas: TP, CP and PP peers of one replica share it."""
    return mesh["dp_replicate"].get_local_rank() * dims.dp_shard + mesh["dp_shard"].get_local_rank()
