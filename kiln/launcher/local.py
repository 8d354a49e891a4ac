"""`kiln launch`: N workers on this machine, under torch's elastic agent or under mpiexec.

Both run the same worker, `python -m kiln.cli train <run_dir>/config.yaml`, which finds its rank
through kiln.distributed.rank. When a worker fails, the elastic agent (`torch.distributed.launcher`,
the engine behind torchrun) stops the others and kiln starts all of them again under a fresh agent, up
to `max_restarts` times; workers resume from `checkpoints/latest`. Under MPI a failed `mpiexec` is
rerun the same way. Exit status 2 (a config or input error) is never retried. Signals: see
kiln.distributed.signals and docs/launching.md "Signals and failures".
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Optional, Sequence

from kiln.config import Config, save_run_config
from kiln.distributed import parallel_dims
from kiln.distributed.signals import STOP_SIGNALS, Interrupted, launcher_env
from kiln.errors import KilnError

log = logging.getLogger("kiln.launcher")


def prepare_run(cfg: Config, nproc: int) -> Path:
    """Check the layout against the world size and save the resolved config the workers will read."""
    if nproc < 1:
        raise KilnError(f"--nproc must be >= 1, got {nproc}")
    parallel_dims(cfg, nproc)
    return save_run_config(cfg)


def worker_args(config_path: Path) -> list[str]:
    return ["-m", "kiln.cli", "train", str(config_path)]


RESTART_COUNT_ENV = "KILN_RESTART_COUNT"  # 0 on the first attempt, k on the k-th restart
NOT_RETRIED = (KilnError.exit_code,)  # a config or input error fails the same way every time
STOP_GRACE_S = 120  # after Ctrl-C/SIGTERM, workers get this long to checkpoint before SIGKILL


def _worker_env() -> None:
    # Like torchrun: one thread per worker unless the user chose otherwise (N workers share the cores).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    # c10d logs a C++ stack ("TCPStore ... Connection reset by peer", frame #0..#46) at WARNING in every
    # survivor when one worker exits; kiln's own one-line error says what happened.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    os.environ.update(launcher_env())  # workers exit when this process dies, even by kill -9


def _codes(failures: dict) -> str:
    return "; ".join(f"rank {r}: exit {f.exitcode}" for r, f in sorted(failures.items()))


def launch_local(worker: Sequence[str], nproc: int, max_restarts: int = 0,
                 python: Optional[str] = None) -> int:
    """Run `nproc` copies of `python *worker` under torch's elastic agent.

    Returns 0; 2 when a worker failed with a config/input error (exit 2: never retried, a restart
    fails the same way); 1 when workers still failed after `max_restarts` restarts. SIGINT/SIGTERM
    raise `Interrupted` once the agent has passed the signal on and the workers have checkpointed.
    Each attempt is a fresh agent and rendezvous, so kiln decides what is worth a restart.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if max_restarts < 0:
        raise KilnError(f"--max-restarts must be >= 0, got {max_restarts}")
    _worker_env()
    # Workers must not share the agent's rendezvous store: after a restart they would read the dead
    # attempt's gloo/NCCL addresses from it (pytorch/pytorch#135712). Each attempt gets a fresh store.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    saved = {s: signal.getsignal(s) for s in STOP_SIGNALS}  # the agent replaces them with its own
    failures: dict = {}
    try:
        for attempt in range(max_restarts + 1):
            if attempt:
                print(f"kiln: workers failed ({_codes(failures)}); restart {attempt}/{max_restarts} "
                      "(workers resume from checkpoints/latest)", file=sys.stderr, flush=True)
            os.environ[RESTART_COUNT_ENV] = str(attempt)  # TORCHELASTIC_RESTART_COUNT is per agent: 0
            config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                                  run_id=f"kiln-{uuid.uuid4().hex[:8]}", rdzv_backend="c10d",
                                  rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5,
                                  start_method="spawn", shutdown_timeout=STOP_GRACE_S)
            try:
                elastic_launch(config, python or sys.executable)(*worker)
                return 0
            except ChildFailedError as exc:
                failures = exc.failures
            final = {r: f for r, f in failures.items() if f.exitcode in NOT_RETRIED}
            if final:
                rank, failure = min(final.items())
                said = failure.message if failure.message.startswith("kiln:") else f"kiln: {_codes(failures)}"
                print(f"kiln: not restarting: rank {rank} exited with status {failure.exitcode} "
                      f"(an error a restart cannot fix)\n{said}", file=sys.stderr, flush=True)
                return failure.exitcode
    except SignalException as exc:
        raise Interrupted(exc.sigval) from None
    finally:
        for signum, handler in saved.items():
            if handler is not None:
                signal.signal(signum, handler)
    print(f"kiln: workers failed after {max_restarts} restart(s): {_codes(failures)}", file=sys.stderr)
    return 1


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
    """Run `python *worker` under mpiexec, rerunning the whole job after a failure (up to max_restarts).

    Exit status 2 (a config/input error) is never rerun. mpiexec runs in its own session, so a
    terminal's Ctrl-C reaches it once, through this process: SIGINT/SIGTERM are passed on (hydra
    hands them to every rank, which checkpoints and stops), then `Interrupted` is raised."""
    if max_restarts < 0:
        raise KilnError(f"--max-restarts must be >= 0, got {max_restarts}")
    _worker_env()
    cmd = mpiexec_command(find_mpiexec(mpiexec), nproc, python or sys.executable, worker)
    rc = 1
    for attempt in range(max_restarts + 1):
        if attempt:
            print(f"kiln: mpiexec exited with status {rc}; restart {attempt}/{max_restarts} "
                  "(workers resume from checkpoints/latest)", file=sys.stderr, flush=True)
        os.environ[RESTART_COUNT_ENV] = str(attempt)
        rc = _run_forwarding_signals(cmd)
        if rc == 0:
            return 0
        if rc in NOT_RETRIED:
            print(f"kiln: not restarting: mpiexec exited with status {rc} (an error a restart cannot fix)",
                  file=sys.stderr)
            return rc
    print(f"kiln: mpiexec exited with status {rc}", file=sys.stderr)
    return 1


def _run_forwarding_signals(cmd: Sequence[str]) -> int:
    """`cmd`'s exit status. A SIGINT/SIGTERM to this process is passed on and, once `cmd` has
    exited, raised as `Interrupted`; a second one kills `cmd` (hydra then kills every rank)."""
    received: list[int] = []

    def forward(signum: int, _frame) -> None:
        if not received:
            received.append(signum)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)
        else:  # a second one: stop waiting for checkpoints
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    saved = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        raise KilnError(f"cannot run {cmd[0]}: {exc}") from None
    try:
        for signum in STOP_SIGNALS:
            signal.signal(signum, forward)
        rc = proc.wait()  # the handler runs inside and wait() resumes: it returns when mpiexec exits
    except BaseException:  # never leave mpiexec behind
        proc.kill()
        proc.wait()
        raise
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    if received:
        raise Interrupted(received[0])
    return rc
