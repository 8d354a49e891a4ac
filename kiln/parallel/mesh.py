"""Parallel dims: every mesh dimension derived from the config and world size, validated up front.

`check_layout(cfg, world_size)` raises `ConfigError` for impossible layouts before any process
group exists (call it from the launcher and from `kiln train` before `init_process_group`);
`build_mesh` then creates a 4-D `DeviceMesh` with named dims pp, dp_replicate, dp_shard, tp
(tp innermost, so tensor-parallel peers are neighbouring ranks, i.e. on the same node).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.config import Config, ffn_dim, resolve_world
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


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(key, message)


def check_layout(cfg: Config, world_size: int) -> ParallelDims:
    """Resolve the mesh for `world_size` and check it against the model; raise ConfigError."""
    _check(world_size >= 1, "parallel", f"world size must be >= 1, got {world_size}")
    dims = resolve_world(cfg, world_size)
    p, m = cfg.parallel, cfg.model
    kv = m.n_kv_heads or m.n_heads
    tp, pp = dims["tp"], dims["pp"]
    _check(m.n_heads % tp == 0, "parallel.tp", f"model.n_heads={m.n_heads} is not divisible by tp={tp}")
    _check(kv % tp == 0, "parallel.tp", f"model.n_kv_heads={kv} is not divisible by tp={tp}")
    _check(ffn_dim(m) % tp == 0, "parallel.tp", f"model ffn_dim={ffn_dim(m)} is not divisible by tp={tp}")
    _check(m.vocab_size % tp == 0, "parallel.tp",
           f"model.vocab_size={m.vocab_size} is not divisible by tp={tp} (vocab-parallel embedding/output)")
    if p.sequence_parallel and tp > 1:
        _check(cfg.data.seq_len % tp == 0, "data.seq_len",
               f"{cfg.data.seq_len} is not divisible by tp={tp} (sequence parallel shards the sequence)")
    if m.tie_embeddings:
        _check(tp == 1 and pp == 1, "model.tie_embeddings", "tied embeddings need tp=1 and pp=1")
    virtual = p.pp_virtual_stages if pp > 1 else 1
    if pp > 1 and p.pp_schedule in ("gpipe", "1f1b"):
        _check(virtual == 1, "parallel.pp_virtual_stages",
               f"{p.pp_schedule} runs one stage per rank; use interleaved_1f1b or zero_bubble for virtual stages")
    if pp > 1 and p.pp_schedule == "interleaved_1f1b":
        _check(virtual > 1, "parallel.pp_virtual_stages", "interleaved_1f1b needs pp_virtual_stages > 1")
    stages = pp * virtual
    _check(m.n_layers >= stages, "parallel.pp",
           f"model.n_layers={m.n_layers} < pipeline stages pp*pp_virtual_stages={stages}")
    micro = (p.pp_microbatches or pp) if pp > 1 else 1
    if pp > 1:
        _check(micro >= pp, "parallel.pp_microbatches", f"{micro} must be >= pp={pp}")
        _check(cfg.train.micro_batch % micro == 0, "parallel.pp_microbatches",
               f"train.micro_batch={cfg.train.micro_batch} is not divisible by {micro} pipeline micro-batches")
        if virtual > 1 or p.pp_schedule == "zero_bubble":
            _check(micro % pp == 0, "parallel.pp_microbatches",
                   f"{p.pp_schedule} needs micro-batches ({micro}) to be a multiple of pp={pp}")
    if p.engine == "deepspeed":
        _check(tp == 1 and pp == 1, "parallel.engine", "deepspeed supports DP-only layouts (tp=1, pp=1)")
        _check(dims["dp_replicate"] == 1, "parallel.dp_replicate",
               "deepspeed shards over all DP ranks; leave dp_replicate=1")
        _check(p.init != "sharded", "parallel.init", "sharded initialization needs parallel.engine=native; "
               "DeepSpeed builds the full model on every rank before ZeRO partitions it")
    return ParallelDims(pp=pp, dp_replicate=dims["dp_replicate"], dp_shard=dims["dp_shard"], tp=tp,
                        virtual_stages=virtual, microbatches=micro)


def build_mesh(dims: ParallelDims, device: torch.device):
    """The 4-D mesh (size-1 dims included, so `mesh["tp"]` always exists)."""
    from torch.distributed.device_mesh import init_device_mesh

    shape = (dims.pp, dims.dp_replicate, dims.dp_shard, dims.tp)
    return init_device_mesh(device.type, shape, mesh_dim_names=DIM_NAMES)


def dp_coordinate(mesh, dims: ParallelDims) -> int:
    """This rank's index among DP replicas: TP and PP peers of one replica share it."""
    return mesh["dp_replicate"].get_local_rank() * dims.dp_shard + mesh["dp_shard"].get_local_rank()
