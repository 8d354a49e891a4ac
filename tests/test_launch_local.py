"""`kiln launch` end to end: real `kiln train` workers under torch's elastic agent and under mpiexec.

Oracle: the same tiny DP=2 run, uninterrupted under the elastic agent, gives the reference final
loss and data position. The MPI launch and a run whose worker is SIGKILLed mid-way (restarted by
the agent, resumed from its last checkpoint) must end on exactly that step, token count, data
position and loss.
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import final_state, kill_tree, run_group, logged_step

STEPS = 30
TINY = ["model.vocab_size=64", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=128",
        "data.synthetic=markov", "data.seq_len=32", "train.micro_batch=4", f"train.steps={STEPS}",
        "train.eval_every=0", "train.device=cpu", "checkpoint.every=5", "checkpoint.keep_last=2",
        "logging.log_every=1", "logging.tensorboard=false", "logging.progress=false"]


def _env():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PMI_", "OMPI_", "PMIX_", "TORCHELASTIC_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _launch_cmd(tmp_path, name, *flags):
    return [sys.executable, "-m", "kiln.cli", "launch", *TINY, f"train.run_dir={tmp_path}", f"train.name={name}",
            "--nproc", "2", *flags]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("launch_ref")
    done = run_group(_launch_cmd(tmp, "ref"), env=_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return final_state(tmp / "ref")


@pytest.mark.timeout(420)
def test_local_launch_trains_dp2(reference):
    assert reference["step"] == reference["ckpt_step"] == STEPS
    assert reference["steps_logged"] == list(range(1, STEPS + 1))
    assert reference["tokens"] == STEPS * 4 * 32 * 2  # micro_batch * seq_len * two DP ranks per step
    assert sorted(reference["data_state"]) == ["0", "1"]


@pytest.mark.timeout(420)
def test_mpi_launch_trains_the_same_dp2_job(tmp_path, reference):
    done = run_group(_launch_cmd(tmp_path, "mpi", "--launcher", "mpi"), env=_env(), capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    got = final_state(tmp_path / "mpi")
    assert {k: got[k] for k in ("step", "tokens", "data_state")} == \
           {k: reference[k] for k in ("step", "tokens", "data_state")}
    assert got["loss"] == pytest.approx(reference["loss"], abs=1e-6)


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


@pytest.mark.timeout(480)
def test_sigkilled_worker_is_restarted_and_resumes_from_its_checkpoint(tmp_path, reference):
    run_dir = tmp_path / "killed"
    log = open(tmp_path / "launch.log", "w")
    proc = subprocess.Popen(_launch_cmd(tmp_path, "killed", "--max-restarts", "1"), env=_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while logged_step(run_dir) < 7:  # past the step-5 checkpoint, so some work is lost and redone
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "launch.log").read_text()[-3000:]
            time.sleep(0.05)
        workers = [p for p in _children(proc.pid) if "kiln.cli train" in _cmdline(p)]
        assert len(workers) == 2, workers
        killed_at = logged_step(run_dir)
        os.kill(workers[1], signal.SIGKILL)
        assert proc.wait(timeout=400) == 0, (tmp_path / "launch.log").read_text()[-3000:]
    finally:
        kill_tree(proc.pid)  # the agent and any worker it left behind
        log.close()
    output = (tmp_path / "launch.log").read_text()
    resumed = re.findall(r"resumed from \S+ at step (\d+)", output)
    assert killed_at < STEPS, "the run finished before the kill: nothing was tested"
    assert len(resumed) == 1 and 5 <= int(resumed[0]) <= killed_at, output[-3000:]
    got = final_state(run_dir)
    assert got["steps_logged"] == list(range(1, STEPS + 1))
    assert {k: got[k] for k in ("step", "tokens", "data_state")} == \
           {k: reference[k] for k in ("step", "tokens", "data_state")}
    assert got["loss"] == pytest.approx(reference["loss"], abs=1e-6)


def test_open_mpi_gets_the_flags_it_needs(tmp_path):
    from kiln.launcher.local import mpiexec_command

    fake = tmp_path / "mpiexec"
    fake.write_text("#!/bin/sh\necho 'mpiexec (OpenRTE) 4.1.4'\n")
    fake.chmod(0o755)
    cmd = mpiexec_command(str(fake), 4, "python", ["-m", "kiln.cli", "train", "c.yaml"])
    assert cmd[:4] == [str(fake), "-n", "4", "--oversubscribe"]
    assert ("--allow-run-as-root" in cmd) == (os.geteuid() == 0)
    fake.write_text("#!/bin/sh\necho 'HYDRA build details:'\n")
    assert mpiexec_command(str(fake), 2, "python", ["w.py"]) == [str(fake), "-n", "2", "python", "w.py"]


def test_missing_mpiexec_is_one_clear_line(tmp_path):
    done = run_group(_launch_cmd(tmp_path, "nompi", "--launcher", "mpi", "--mpiexec", str(tmp_path / "nope")),
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == f"kiln: mpiexec {str(tmp_path / 'nope')!r} not found"
    assert "Traceback" not in done.stderr
