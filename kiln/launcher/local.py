"""`kiln launch`: N workers on this machine, under torch's elastic agent or under mpiexec.

Both run the same worker, `python -m kiln.cli train <run_dir>/config.yaml`, which finds its rank
through kiln.launcher.bootstrap. The elastic agent (`torch.distributed.launcher`, the engine behind
torchrun) restarts all workers when one fails, up to `max_restarts` times; workers resume from
`checkpoints/latest`. Under MPI a failed `mpiexec` is rerun the same way.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Optional, Sequence

from kiln.config import Config, save_run_config
from kiln.errors import KilnError
from kiln.parallel.mesh import check_layout

log = logging.getLogger("kiln.launcher")


def prepare_run(cfg: Config, nproc: int) -> Path:
    """Check the layout against the world size and save the resolved config the workers will read."""
    if nproc < 1:
        raise KilnError(f"--nproc must be >= 1, got {nproc}")
    check_layout(cfg, nproc)
    return save_run_config(cfg)


def worker_args(config_path: Path) -> list[str]:
    return ["-m", "kiln.cli", "train", str(config_path)]


def _worker_env() -> None:
    # Like torchrun: one thread per worker unless the user chose otherwise (N workers share the cores).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")


def launch_local(worker: Sequence[str], nproc: int, max_restarts: int = 0,
                 python: Optional[str] = None) -> int:
    """Run `nproc` copies of `python *worker` under torch's elastic agent; 0, or 1 when they failed for good."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if max_restarts < 0:
        raise KilnError(f"--max-restarts must be >= 0, got {max_restarts}")
    _worker_env()
    # Workers must not share the agent's rendezvous store: after a restart they would read the dead
    # attempt's gloo/NCCL addresses from it (pytorch/pytorch#135712). Each attempt gets a fresh store.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"kiln-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=max_restarts,
                          monitor_interval=0.5, start_method="spawn")
    try:
        elastic_launch(config, python or sys.executable)(*worker)
    except ChildFailedError as exc:
        failures = "; ".join(f"rank {r}: exit {f.exitcode}" for r, f in sorted(exc.failures.items()))
        print(f"kiln: workers failed after {max_restarts} restart(s): {failures}", file=sys.stderr)
        return 1
    return 0


def find_mpiexec(explicit: Optional[str] = None) -> str:
    """The mpiexec beside this Python (the `mpich` wheel from kiln[mpi]) first, then PATH."""
    if explicit:
        found = shutil.which(explicit)
        if not found:
            raise KilnError(f"mpiexec {explicit!r} not found")
        return found
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("mpiexec") or shutil.which("mpirun")
    if not found:
        raise KilnError("mpiexec not found: pip install 'kiln[mpi]' (mpi4py + the mpich wheel) or load an MPI module")
    return found


def mpiexec_command(mpiexec: str, nproc: int, python: str, args: Sequence[str]) -> list[str]:
    """`mpiexec -n N python ...`, plus the flags Open MPI needs as root / beyond the core count."""
    try:
        version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30)
        text = version.stdout + version.stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KilnError(f"{mpiexec} does not run: {exc}") from None
    flags: list[str] = []
    if "Open MPI" in text or "OpenRTE" in text or "open-mpi" in text:
        flags.append("--oversubscribe")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            flags.append("--allow-run-as-root")
    return [mpiexec, "-n", str(nproc), *flags, python, *args]


def launch_mpi(worker: Sequence[str], nproc: int, max_restarts: int = 0, mpiexec: Optional[str] = None,
               python: Optional[str] = None) -> int:
    """Run `python *worker` under mpiexec, rerunning the whole job after a failure (up to max_restarts)."""
    if max_restarts < 0:
        raise KilnError(f"--max-restarts must be >= 0, got {max_restarts}")
    _worker_env()
    cmd = mpiexec_command(find_mpiexec(mpiexec), nproc, python or sys.executable, worker)
    rc = 1
    for attempt in range(max_restarts + 1):
        if attempt:
            print(f"kiln: mpiexec exited with status {rc}; restart {attempt}/{max_restarts} "
                  "(workers resume from checkpoints/latest)", file=sys.stderr, flush=True)
        try:
            rc = subprocess.run(cmd).returncode
        except OSError as exc:
            raise KilnError(f"cannot run {cmd[0]}: {exc}") from None
        if rc == 0:
            return 0
    print(f"kiln: mpiexec exited with status {rc}", file=sys.stderr)
    return 1
