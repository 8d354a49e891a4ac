"""`kiln submit` on a real one-node Slurm cluster (scripts/slurm_local.sh: Debian's slurmctld, slurmd and
munge on localhost).

Oracles: Slurm's own accounting (`sacct -c` reads the job completion file), the run's metrics and
checkpoint metadata, and an uninterrupted job of the same config: a job sent the requeue signal
mid-run must checkpoint, requeue, resume, and end on exactly the reference's step, token count,
per-rank data position and loss.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import final_state

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "slurm_local.sh"
PROFILE = REPO / "configs" / "cluster" / "local-cpu.yaml"
STEPS = 30
TINY = ["model.vocab_size=64", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=128",
        "data.synthetic=markov", "data.seq_len=32", "train.micro_batch=4", f"train.steps={STEPS}",
        "train.eval_every=0", "checkpoint.every=10", "logging.log_every=1", "logging.tensorboard=false",
        "logging.progress=false"]


@pytest.fixture(scope="session")
def slurm_env():
    """Start the local cluster (installing Slurm if missing, which needs root and apt-get)."""
    installed = all(shutil.which(c) or Path(f"/usr/sbin/{c}").exists() for c in ("slurmctld", "slurmd", "sbatch"))
    if not installed and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        pytest.skip("Slurm is not installed and this user cannot install it (needs root and apt-get)")
    was_running = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True).returncode == 0
    t0 = time.time()
    done = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"slurm_local.sh start failed:\n{done.stderr[-3000:]}"
    conf = re.search(r"export SLURM_CONF=(\S+)", done.stdout).group(1)
    print(f"local Slurm cluster ready in {time.time() - t0:.1f}s")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PMI_", "OMPI_", "PMIX_", "TORCHELASTIC_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(SLURM_CONF=conf, OMP_NUM_THREADS="1")
    yield env
    if not was_running:
        subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, timeout=120)


def kiln(env, cwd, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def submit(env, tmp_path, name, *extra) -> tuple[str, Path]:
    done = kiln(env, tmp_path, "submit", str(PROFILE), *TINY, f"train.run_dir={tmp_path}", f"train.name={name}",
                *extra, "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    return info["job_id"], Path(info["run_dir"])


def wait_for(env, job_id: str, timeout: float = 300) -> str:
    """Poll squeue until the job leaves the queue; return its final state from `sacct -c`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        queued = subprocess.run(["squeue", "-h", "-j", job_id], env=env, capture_output=True, text=True)
        if not queued.stdout.strip():
            break
        time.sleep(0.5)
    else:
        subprocess.run(["scancel", job_id], env=env)
        pytest.fail(f"job {job_id} did not finish in {timeout}s")
    records = subprocess.run(["sacct", "-c", "-j", job_id, "-n", "-P", "-o", "JobID,State"], env=env,
                             capture_output=True, text=True).stdout.split()
    return records[-1].split("|")[1]


@pytest.fixture(scope="module")
def reference_job(slurm_env, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm_ref")
    job_id, run_dir = submit(slurm_env, tmp, "ref")
    return job_id, run_dir, wait_for(slurm_env, job_id), tmp


@pytest.mark.timeout(400)
def test_two_task_job_runs_to_completion(slurm_env, reference_job):
    job_id, run_dir, state, tmp = reference_job
    log = (run_dir / f"slurm-{job_id}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert "2 workers" in log
    got = final_state(run_dir)
    assert got["step"] == got["ckpt_step"] == STEPS
    assert got["tokens"] == STEPS * 4 * 32 * 2  # both ranks fed a micro-batch every step
    assert sorted(got["data_state"]) == ["0", "1"]  # and both saved their data position
    assert all(s["batches_yielded"] == STEPS for s in got["data_state"].values())
    assert (run_dir / "submit.sbatch").is_file() and (run_dir / "config.yaml").is_file()
    status = kiln(slurm_env, tmp, "status", str(run_dir), "--json")
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["job_id"] == job_id and info["job"]["state"] == "COMPLETED"
    assert info["metrics"]["step"] == STEPS


@pytest.mark.timeout(500)
def test_requeue_signal_checkpoints_requeues_and_resumes(slurm_env, reference_job, tmp_path):
    job_id, run_dir = submit(slurm_env, tmp_path, "requeued")
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and '"step": 3,' in metrics.read_text()):
        assert time.time() < deadline, "the job never reached step 3"
        time.sleep(0.05)
    # What Slurm's --signal=USR1@GRACE does near the time limit, now: USR1 to every task of the job.
    subprocess.run(["scancel", "--signal=USR1", job_id], env=slurm_env, check=True)
    state = wait_for(slurm_env, job_id, timeout=400)
    log = (run_dir / f"slurm-{job_id}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert "(restart 1)" in log, log[-3000:]  # Slurm started the same job id a second time
    resumed = re.findall(r"resumed from \S+step_(\d+) at step (\d+)", log)
    assert len(resumed) == 1 and 3 <= int(resumed[0][1]) < STEPS, log[-3000:]
    got = final_state(run_dir)
    ref = final_state(reference_job[1])
    assert got["steps_logged"] == list(range(1, STEPS + 1))
    assert {k: got[k] for k in ("step", "tokens", "ckpt_step", "data_state")} == \
           {k: ref[k] for k in ("step", "tokens", "ckpt_step", "data_state")}
    assert got["loss"] == pytest.approx(ref["loss"], abs=1e-6)


@pytest.mark.timeout(120)
def test_sbatch_refusal_is_reported(slurm_env, tmp_path):
    done = kiln(slurm_env, tmp_path, "submit", str(PROFILE), *TINY, f"train.run_dir={tmp_path}",
                "--partition", "no-such-partition")
    assert done.returncode == 2
    assert done.stderr.startswith("kiln: sbatch refused the job:") and "partition" in done.stderr.lower()
    assert "Traceback" not in done.stderr
