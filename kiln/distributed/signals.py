"""Signals: checkpoint-and-stop requests, the requeue signal, and workers that outlive their launcher.

Three signals ask a worker to stop after the current step: SIGUSR1 (Slurm's `--signal=USR1@GRACE`
warning before the time limit: stop and requeue), SIGTERM (`scancel`, `kill`, the elastic agent
shutting a job down) and SIGINT (Ctrl-C). The handler only sets a flag; the train loop polls it once
per step, all ranks agree (any rank flagged is enough), everyone writes a checkpoint and leaves the
loop. A second SIGTERM/SIGINT exits at once, without a checkpoint. Only SIGUSR1 requeues: at exit
rank 0 calls `requeue()` so Slurm runs the job again, which resumes from `checkpoints/latest`.

`kiln launch` exports its pid (`KILN_LAUNCHER_PID`); `watch_launcher()` makes a worker exit when
that process dies, so `kill -9` of the launcher leaves nothing training. It watches only a launcher
that is an ancestor of the worker, so a variable inherited into an unrelated job (a Slurm job
submitted from a launched shell) never fires.
"""
from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

log = logging.getLogger("kiln.distributed")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
REQUEUE_SIGNAL = signal.SIGUSR1
LAUNCHER_PID_ENV = "KILN_LAUNCHER_PID"
_DUPLICATE_S = 1.0  # a repeat within this window is the same request delivered twice (group + forward)


class Interrupted(BaseException):
    """SIGINT/SIGTERM reached a kiln command: the CLI prints one line and exits 128 + signum.

    A BaseException (like KeyboardInterrupt) so that no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_OWNER = os.getpid()  # the process that installs the handlers; forked children inherit them


def _in_forked_child(received: int) -> bool:
    """A forked helper (a DataLoader worker) is not ours to stop: SIGTERM kills it as it would
    have without kiln's handler, SIGINT (a terminal's Ctrl-C reaches the whole group) is left to
    the parent, which stops it."""
    if os.getpid() == _OWNER:
        return False
    if received == signal.SIGTERM:
        signal.signal(received, signal.SIG_DFL)
        os.kill(os.getpid(), received)
    return True


def raise_interrupted(signum: int, _frame=None) -> None:
    """A signal handler for commands that have nothing to save: stop with `Interrupted`."""
    if not _in_forked_child(signum):
        raise Interrupted(signum)


@dataclass
class StopFlag:
    """Set asynchronously by a signal handler; read by the train loop."""

    requested: bool = False
    signum: Optional[int] = None
    signals: tuple = field(default=())
    at: float = 0.0

    def request(self, signum: Optional[int] = None) -> None:
        self.requested = True
        self.signum = signum
        self.at = time.monotonic()

    @property
    def requeue(self) -> bool:
        """Only the requeue signal asks Slurm to run the job again; Ctrl-C and SIGTERM do not."""
        return self.requested and self.signum == REQUEUE_SIGNAL

    @property
    def interrupted(self) -> bool:
        return self.requested and self.signum in STOP_SIGNALS


_flag: Optional[StopFlag] = None


def _say(text: str) -> None:
    # os.write, not print: a handler may run while the main thread is inside a print to stderr.
    try:
        os.write(2, (text + "\n").encode())
    except OSError:
        pass


def _rank() -> int:
    from kiln.distributed.rank import current

    info = current()
    return info.rank if info else int(os.environ.get("RANK", "0") or 0)


def _handler(received: int, _frame) -> None:
    if _in_forked_child(received):
        return
    flag = _flag
    assert flag is not None
    name = signal.Signals(received).name
    if received in STOP_SIGNALS and flag.interrupted:
        if time.monotonic() - flag.at < _DUPLICATE_S:
            return
        _say(f"kiln: rank {_rank()}: second {name}: exiting now, without a checkpoint")
        os._exit(128 + received)
    if not flag.requested and _rank() == 0:
        what = "checkpoint, stop and requeue" if received == REQUEUE_SIGNAL else "checkpoint and stop"
        more = "" if received == REQUEUE_SIGNAL else f" (another {name} exits at once)"
        _say(f"kiln: {name}: {what} after this step{more}")
    if not flag.interrupted:  # an interrupt outranks a pending requeue: the user wants it stopped
        flag.request(received)


def install_stop_handlers() -> StopFlag:
    """SIGUSR1, SIGTERM and SIGINT set one process-wide flag instead of killing the process.

    Idempotent: a signal caught before the train loop starts is still seen by it. Outside the main
    thread Python cannot install handlers; the flag then never fires (logged)."""
    global _flag, _OWNER
    if _flag is None:
        _OWNER = os.getpid()
        _flag = StopFlag(signals=(REQUEUE_SIGNAL, *STOP_SIGNALS))
        if threading.current_thread() is threading.main_thread():
            for signum in _flag.signals:
                signal.signal(signum, _handler)
        else:
            log.warning("not in the main thread: signals will not request a checkpoint")
    return _flag


def install_requeue_handler(signum: int = REQUEUE_SIGNAL) -> StopFlag:
    """The train loop's stop flag (see `install_stop_handlers`)."""
    return install_stop_handlers()


def current_flag() -> Optional[StopFlag]:
    return _flag


def wait_for_stop(timeout_s: float) -> Optional[StopFlag]:
    """The flag once a stop signal arrives within `timeout_s`, else None.

    A worker whose collective failed waits here: when a peer died, the launcher signals the
    survivors a moment later, and their error is then a consequence, not worth a traceback."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if _flag is not None and _flag.requested:
            return _flag
        time.sleep(0.05)
    return _flag if _flag is not None and _flag.requested else None


# -- the launcher watch -----------------------------------------------------------------------------
def launcher_env() -> dict:
    """Exported by `kiln launch` to its workers."""
    return {LAUNCHER_PID_ENV: str(os.getpid())}


def _parent_of(pid: int) -> Optional[int]:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return int(text.rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _ancestors(pid: int) -> list[int]:
    """Parent, grandparent, ... of `pid` (from /proc; just the parent where there is no /proc)."""
    if not Path("/proc/self/stat").exists():
        return [os.getppid()] if pid == os.getpid() else []
    out: list[int] = []
    parent = _parent_of(pid)
    while parent and parent not in out and len(out) < 64:
        out.append(parent)
        parent = _parent_of(parent)
    return out


def watch_launcher(environ: Optional[Mapping[str, str]] = None) -> Optional[threading.Thread]:
    """Exit this worker (status 1, one line) when the `kiln launch` that started it dies.

    The elastic agent's workers are its children; mpiexec's are its grandchildren (through hydra's
    proxy), so any ancestor counts. Without KILN_LAUNCHER_PID (srun, torchrun, by hand), or when that
    process is not an ancestor (a stale variable), nothing is watched: srun manages its own tasks."""
    env = os.environ if environ is None else environ
    value = env.get(LAUNCHER_PID_ENV, "")
    if not value.isdigit():
        return None
    pid = int(value)
    if pid not in _ancestors(os.getpid()):
        log.debug("%s=%s is not an ancestor of this process: not watching it", LAUNCHER_PID_ENV, pid)
        return None
    fd = None
    if hasattr(os, "pidfd_open"):
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            fd = None
    if fd is None and pid != os.getppid():
        return None  # no pidfd and not our parent: no race-free way to watch it
    if fd is not None and pid not in _ancestors(os.getpid()):  # died (and its pid reused) in between
        os.close(fd)
        _launcher_gone(pid)
    thread = threading.Thread(target=_watch, args=(pid, fd), name="kiln-launcher-watch", daemon=True)
    thread.start()
    return thread


def _watch(pid: int, fd: Optional[int]) -> None:
    if fd is not None:
        select.select([fd], [], [])  # a pidfd turns readable when the process exits
    else:
        while os.getppid() == pid:  # orphans are re-parented at once, whoever reaps the launcher
            time.sleep(0.5)
    _launcher_gone(pid)


def _launcher_gone(pid: int) -> None:
    _say(f"kiln: rank {_rank()}: the launcher (pid {pid}) is gone; stopping this worker")
    os._exit(1)


# -- Slurm requeue ----------------------------------------------------------------------------------
def requeue(job_id: Optional[str] = None) -> bool:
    """Ask Slurm to requeue this job (`scontrol requeue $SLURM_JOB_ID`); False when not under Slurm or
    when Slurm refuses (the reason is printed: the job then simply ends after its checkpoint)."""
    job_id = job_id or os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return False
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        print("kiln: cannot requeue: scontrol not found on PATH", file=sys.stderr)
        return False
    done = subprocess.run([scontrol, "requeue", str(job_id)], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"kiln: scontrol requeue {job_id} failed: {(done.stderr or done.stdout).strip()}", file=sys.stderr)
        return False
    print(f"kiln: job {job_id} requeued; it resumes from checkpoints/latest", file=sys.stderr, flush=True)
    return True
