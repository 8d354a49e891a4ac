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
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        finally:
            try:  # workers the agent orphaned on exit
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


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
