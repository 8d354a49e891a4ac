"""`kiln status RUN`: the Slurm job's state (squeue while queued or running, sacct after) and the
latest metrics from the run directory."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Optional

from kiln.errors import KilnError
from kiln.launcher.slurm import JOB_ID_FILE


def find_run_dir(run: str) -> Path:
    for candidate in (Path(run), Path("runs") / run):
        if candidate.is_dir():
            return candidate.resolve()
    raise KilnError(f"run {run!r} not found (give a run directory, or a name under runs/)")


def _query(cmd: list[str]) -> Optional[list[str]]:
    """Lines of output, or None when the command is missing or fails."""
    exe = shutil.which(cmd[0])
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        return None
    return [line for line in done.stdout.splitlines() if line.strip()]


def job_state(job_id: str) -> dict:
    """State from squeue (live jobs), then sacct (slurmdbd), then `sacct -c` (the jobcomp file)."""
    lines = _query(["squeue", "-h", "-j", job_id, "-o", "%T|%r|%M"])
    if lines:
        state, reason, elapsed = lines[0].split("|")
        return {"state": state, "reason": "" if reason == "None" else reason, "elapsed": elapsed, "source": "squeue"}
    for cmd, source in ((["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,ExitCode"], "sacct"),
                        (["sacct", "-c", "-j", job_id, "-n", "-P", "-o", "State,ExitCode"], "sacct -c")):
        lines = _query(cmd)
        if lines:
            state, exit_code = lines[-1].split("|")[:2]  # the last record: a requeued job has several
            return {"state": state.split()[0], "exit_code": exit_code, "source": source}
    if shutil.which("squeue") is None:
        return {"state": "unknown", "reason": "squeue/sacct not found on PATH"}
    return {"state": "unknown", "reason": "Slurm has no record of this job"}


def latest_metrics(run_dir: Path) -> tuple[Optional[dict], Optional[dict]]:
    """The last training record and the last eval record of metrics.jsonl."""
    train = evaluation = None
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written right now
            if "loss" in record:
                train = record
            elif "eval_loss" in record:
                evaluation = record
    return train, evaluation


def run_status(run: str) -> dict:
    run_dir = find_run_dir(run)
    info: dict = {"run_dir": str(run_dir)}
    id_file = run_dir / JOB_ID_FILE
    if id_file.is_file():
        job_id = id_file.read_text().strip()
        info["job_id"] = job_id
        info["job"] = job_state(job_id)
        info["log"] = str(run_dir / f"slurm-{job_id}.out")
    latest = run_dir / "checkpoints" / "latest"
    if latest.exists():
        info["latest_checkpoint"] = latest.read_text().strip() if latest.is_file() else str(latest.resolve().name)
    info["metrics"], info["eval"] = latest_metrics(run_dir)
    return info


def format_status(info: dict) -> str:
    lines = [f"run:        {info['run_dir']}"]
    if "job_id" in info:
        job = info["job"]
        extra = ", ".join(f"{k} {v}" for k, v in job.items() if k not in ("state", "source") and v)
        lines.append(f"slurm job:  {info['job_id']} {job['state']}" + (f" ({extra})" if extra else ""))
        lines.append(f"log:        {info['log']}")
    else:
        lines.append("slurm job:  none (not submitted with kiln submit)")
    if info.get("latest_checkpoint"):
        lines.append(f"checkpoint: {info['latest_checkpoint']}")
    m = info.get("metrics")
    if m:
        lines.append(f"metrics:    step {m['step']}, tokens {m.get('tokens', 0):,}, loss {m['loss']:.4f}")
    else:
        lines.append("metrics:    none yet")
    if info.get("eval"):
        lines.append(f"eval:       step {info['eval']['step']}, loss {info['eval']['eval_loss']:.4f}")
    return "\n".join(lines)
