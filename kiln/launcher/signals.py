"""The requeue signal: Slurm warns a job (`--signal=USR1@GRACE`) before its time runs out.

The handler only sets a flag; the train loop polls it once per step, all ranks agree (any rank
flagged is enough), everyone writes a checkpoint and leaves the loop, and at exit rank 0 calls
`requeue()` so Slurm runs the job again, which resumes from `checkpoints/latest`.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Optional

log = logging.getLogger("kiln.launcher")


@dataclass
class StopFlag:
    """Set asynchronously by a signal handler; read by the train loop."""

    requested: bool = False
    signum: Optional[int] = None
    signals: tuple = field(default=())

    def request(self, signum: Optional[int] = None) -> None:
        self.requested = True
        self.signum = signum


def install_requeue_handler(signum: int = signal.SIGUSR1) -> StopFlag:
    """Make `signum` (SIGUSR1 by default) set `flag.requested` instead of killing the process.

    Outside the main thread Python cannot install handlers; the flag then never fires (logged).
    """
    flag = StopFlag(signals=(signum,))

    def handler(received: int, _frame) -> None:
        flag.request(received)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signum, handler)
    else:
        log.warning("not in the main thread: signal %s will not request a checkpoint", signum)
    return flag


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
