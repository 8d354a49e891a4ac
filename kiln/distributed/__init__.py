"""A worker's place in the job: rank detection, the process group, parallel dims, device, signals.

Everything here runs in the worker and knows nothing of how it was started (kiln.launcher starts
processes; this package is what each of them does to join the job and to leave it).
"""
from kiln.distributed.device import pick_device
from kiln.distributed.dims import ParallelDims, parallel_dims
from kiln.distributed.process_group import any_rank, init_process_group, shutdown
from kiln.distributed.rank import RankInfo, current, detect_rank

__all__ = ["ParallelDims", "RankInfo", "any_rank", "current", "detect_rank", "init_process_group", "parallel_dims",
           "pick_device", "shutdown"]
