"""Rank detection: one description of this worker's place in the job, however it was started.

A worker may be started by torchrun / `kiln launch` (RANK, WORLD_SIZE, ... in the environment),
by `srun` (SLURM_PROCID, SLURM_STEP_NUM_TASKS, ...), by `mpiexec` (rank and size from mpi4py's
COMM_WORLD) or by hand (a single process). `detect_rank()` reads whichever applies and exports the
torchrun variables, so `init_process_group(init_method="env://")` works the same in all four cases.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping, Optional

from kiln.errors import KilnError

MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
SLURM_PORT_BASE = 15000  # job ports stay below Linux's ephemeral range (32768+)
SLURM_PORT_SPAN = 15000


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # "env" | "slurm" | "mpi" | "single"


_current: Optional[RankInfo] = None


def current() -> Optional[RankInfo]:
    """The RankInfo found by the last `detect_rank()` in this process, if any."""
    return _current


def detect_rank(environ: Optional[Mapping[str, str]] = None, export: bool = True) -> RankInfo:
    """Find this worker's rank; order: torchrun env, MPI, Slurm step, single process.

    `mpiexec` inside an allocation starts its proxies with srun (SLURM_PROCID then numbers nodes,
    not ranks), so MPI wins when its size differs from the step's task count; when srun itself
    started every rank (same size, or PMIx with no size variable) the Slurm variables are
    authoritative and no MPI is needed.
    """
    global _current
    env = os.environ if environ is None else environ
    mpi_size = _mpi_size(env)
    # Inside an srun step, MPI variables with the step's size, or PMIx ones with no size at all
    # (srun --mpi=pmix started every task itself), describe the same tasks as Slurm does.
    slurm_owns = _in_slurm_step(env) and mpi_size in (None, -1, _slurm_world(env))
    if "RANK" in env and "WORLD_SIZE" in env:
        info = _from_torchrun(env)
    elif slurm_owns:
        info = _from_slurm(env)
    elif mpi_size is not None:
        info = _from_mpi(env)
    else:
        info = RankInfo(0, 1, 0, 1, env.get("MASTER_ADDR", "127.0.0.1"),
                        _int(env, "MASTER_PORT") if "MASTER_PORT" in env else free_port(), "single")
    if export and environ is None:
        export_env(info)
    _current = info
    return info


def export_env(info: RankInfo, environ: Optional[dict] = None) -> None:
    """Write the torchrun variables for `init_method="env://"` (and LOCAL_RANK for device choice)."""
    env = os.environ if environ is None else environ
    env.update({"RANK": str(info.rank), "WORLD_SIZE": str(info.world_size), "LOCAL_RANK": str(info.local_rank),
                "LOCAL_WORLD_SIZE": str(info.local_world_size), "MASTER_ADDR": info.master_addr,
                "MASTER_PORT": str(info.master_port)})


# -- sources ----------------------------------------------------------------------------------------
def _int(env: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    value = env.get(name)
    if value is None:
        if default is None:
            raise KilnError(f"rank bootstrap: environment variable {name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise KilnError(f"rank bootstrap: {name}={value!r} is not an integer") from None


def _checked(info: RankInfo, what: str) -> RankInfo:
    if not (0 <= info.rank < info.world_size):
        raise KilnError(f"rank bootstrap ({what}): rank {info.rank} is outside world size {info.world_size}")
    if not (0 <= info.local_rank < info.local_world_size):
        raise KilnError(f"rank bootstrap ({what}): local rank {info.local_rank} is outside local world size "
                        f"{info.local_world_size}")
    if not (0 < info.master_port < 65536):
        raise KilnError(f"rank bootstrap ({what}): MASTER_PORT {info.master_port} is not a TCP port")
    return info


def _from_torchrun(env: Mapping[str, str]) -> RankInfo:
    world = _int(env, "WORLD_SIZE")
    if world > 1:
        addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
        if not addr or not port:
            raise KilnError("rank bootstrap: RANK and WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not")
    return _checked(RankInfo(_int(env, "RANK"), world, _int(env, "LOCAL_RANK", 0),
                             _int(env, "LOCAL_WORLD_SIZE", world), env.get("MASTER_ADDR", "127.0.0.1"),
                             _int(env, "MASTER_PORT", 29500), "env"), "torchrun environment")


def _in_slurm_step(env: Mapping[str, str]) -> bool:
    """True inside an srun task; the batch shell itself (no numeric step id) is a single process."""
    return "SLURM_PROCID" in env and env.get("SLURM_STEP_ID", "").isdigit()


def _slurm_world(env: Mapping[str, str]) -> int:
    name = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    return _int(env, name, 1)


def slurm_port(job_id: int) -> int:
    """Every task of a job derives the same port from the job id, with no communication."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def _from_slurm(env: Mapping[str, str]) -> RankInfo:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    hosts = expand_hostlist(nodelist) if nodelist else []
    addr = env.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1")
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else slurm_port(_int(env, "SLURM_JOB_ID", 0))
    per_node = expand_tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "")
    node = _int(env, "SLURM_NODEID", 0)
    local_world = per_node[node] if node < len(per_node) else 1
    return _checked(RankInfo(_int(env, "SLURM_PROCID"), _slurm_world(env), _int(env, "SLURM_LOCALID", 0),
                             local_world, addr, port, "slurm"), "Slurm")


def _mpi_size(env: Mapping[str, str]) -> Optional[int]:
    if not any(v in env for v in MPI_RANK_VARS):
        return None
    for name in MPI_SIZE_VARS:
        if name in env:
            return _int(env, name)
    return -1  # PMIx gives no size variable; ask MPI


def _from_mpi(env: Mapping[str, str]) -> RankInfo:
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise KilnError(f"started by mpiexec but mpi4py cannot be used ({exc}); pip install 'kiln[mpi]'") from None
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = node_comm.Get_rank(), node_comm.Get_size()
    node_comm.Free()
    offer = None
    if rank == 0:
        addr = env.get("MASTER_ADDR") or ("127.0.0.1" if local_size == size else socket.getfqdn())
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT", "").isdigit() else free_port()
        offer = (addr, port)
    addr, port = comm.bcast(offer, root=0)
    return _checked(RankInfo(rank, size, local_rank, local_size, addr, port, "mpi"), "MPI")


# -- helpers ----------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_range(spec: str, nodelist: str) -> list[str]:
    out = []
    for piece in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", piece)
        if not m:
            raise KilnError(f"cannot parse Slurm node list {nodelist!r} (range {piece!r})")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        out += [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
    return out


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand a Slurm host list ("gpu[001-003,7],login1", "r[1-2]-n[01-02]") like `scontrol show hostnames`."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        m = re.match(r"([^\[\]]*)\[([^\]]*)\](.*)$", item)
        if not m:
            if "[" in item or "]" in item:
                raise KilnError(f"cannot parse Slurm node list {nodelist!r}")
            hosts.append(item)
            continue
        prefix, spec, rest = m.groups()
        tails = expand_hostlist(rest) if rest else [""]
        hosts += [prefix + n + t for n in _expand_range(spec, nodelist) for t in tails]
    return hosts


def expand_tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM_TASKS_PER_NODE ("2(x3),1") to one count per node ([2, 2, 2, 1])."""
    counts: list[int] = []
    for item in filter(None, spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not m:
            raise KilnError(f"cannot parse SLURM_TASKS_PER_NODE={spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts
