"""The process group's life: start it, agree across ranks, and leave cleanly.

`shutdown()` is the exit path every worker takes: without barrier + destroy + flush + `os._exit`,
gloo teardown intermittently aborts with SIGABRT (see reference/platform-notes.md).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

import torch
import torch.distributed as dist

from kiln.distributed.rank import RankInfo, current


def init_process_group(world_size: int, device_type: str) -> None:
    """gloo on CPU; on GPU NCCL for CUDA tensors plus gloo for the CPU-side collectives
    (stop flags, object gathers, DCP's async-save coordination). A single process needs none."""
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo")


def any_rank(flag: bool) -> bool:
    """True on every rank if any rank says so (stop requests must be collective decisions)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def shutdown(rank_info: Optional[RankInfo] = None, *, requeue: bool = False, exit_code: int = 0) -> None:
    """End this worker cleanly and never return.

    All ranks agree on `requeue` and the exit status (any rank asking is enough); rank 0 then asks
    Slurm to requeue the job, after the barrier, so every rank has finished its checkpoint first. Then the process group
    is destroyed, output flushed, MPI finalized when MPI started us, and the process leaves with
    `os._exit` (skipping the interpreter teardown that makes gloo abort).
    """
    info = rank_info or current() or RankInfo(0, 1, 0, 1, "127.0.0.1", 0, "single")
    try:
        if dist.is_available() and dist.is_initialized():
            backend = dist.get_backend()
            device = torch.device("cuda", info.local_rank) if backend == "nccl" else torch.device("cpu")
            # Every rank leaves with the same status (a signal that stopped one rank stopped all).
            flag = torch.tensor([1.0 if requeue else 0.0, float(exit_code)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # doubles as the barrier
            requeue, exit_code = bool(flag[0].item()), int(flag[1].item())
            if requeue and info.rank == 0:
                _requeue()
            dist.barrier()
            dist.destroy_process_group()
        elif requeue and info.rank == 0:
            _requeue()
    except Exception as exc:  # a broken group at exit must not hide the exit code
        print(f"kiln: shutdown: {exc}", file=sys.stderr)
        exit_code = exit_code or 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    if info.source == "mpi":
        try:
            from mpi4py import MPI

            if MPI.Is_initialized() and not MPI.Is_finalized():
                MPI.Finalize()
        except ImportError:
            pass
    os._exit(exit_code)


def _requeue() -> None:
    from kiln.distributed.signals import requeue

    requeue()
