import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_group(cmd, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run in its own session: on timeout the whole process tree (launcher agent and
    its workers) is killed, so a hung test leaves no orphans behind."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    if kwargs.pop("capture_output"):
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
    with subprocess.Popen(cmd, start_new_session=True, **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:  # a timeout here or pytest-timeout's interrupt: leave nothing running
            kill_tree(proc.pid)
            proc.communicate()
            raise
        finally:
            kill_tree(proc.pid)  # workers the agent orphaned on exit
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_tree(pid: int) -> None:
    """SIGKILL a process, its descendants (the elastic agent puts workers in their own sessions) and its group."""
    import psutil

    try:
        procs = psutil.Process(pid).children(recursive=True) + [psutil.Process(pid)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def final_state(run_dir: Path) -> dict:
    """Last logged loss per step (a resumed run logs some steps twice) and the final checkpoint's meta."""
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = (record["tokens"], record["loss"])
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((run_dir / "checkpoints" / latest / "meta.json").read_text())
    last = max(losses)
    return {"step": last, "tokens": losses[last][0], "loss": losses[last][1], "ckpt_step": meta["step"],
            "ckpt_tokens": meta["tokens"], "data_state": meta["data_state"], "steps_logged": sorted(losses)}


def logged_step(run_dir: Path) -> int:
    """The newest step a run has logged to metrics.jsonl (0 before the first line is complete)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    return max((json.loads(l)["step"] for l in lines if l.strip().endswith("}")), default=0)
