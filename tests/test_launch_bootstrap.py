"""Rank bootstrap: the same RankInfo whichever way a worker was started.

Environment parsing is checked on recorded environments (what torchrun, srun and mpiexec set);
the MPI path and the elastic agent are checked for real with a tiny worker that joins a gloo group
through `init_method="env://"` and all-reduces its rank.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from conftest import run_group

from kiln.errors import KilnError
from kiln.distributed import rank as bootstrap
from kiln.distributed.rank import RankInfo, detect_rank, expand_hostlist, expand_tasks_per_node, slurm_port


def test_torchrun_environment():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "node7", "MASTER_PORT": "29400", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"}
    info = detect_rank(env)
    assert info == RankInfo(3, 8, 1, 2, "node7", 29400, "env")  # torchrun wins over Slurm (torchrun under srun)


def test_slurm_task_environment():
    # As srun sets it for task 5 of `srun -N3 --ntasks-per-node=2` (second task on the third node).
    env = {"SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "6", "SLURM_NTASKS": "6",
           "SLURM_LOCALID": "1", "SLURM_NODEID": "2", "SLURM_STEP_TASKS_PER_NODE": "2(x3)",
           "SLURM_JOB_ID": "123456", "SLURM_STEP_NODELIST": "gpu[007-009]", "SLURM_JOB_NODELIST": "gpu[007-009]"}
    info = detect_rank(env)
    assert info == RankInfo(5, 6, 1, 2, "gpu007", slurm_port(123456), "slurm")
    assert 1024 < info.master_port < 32768  # below Linux's ephemeral range


def test_uneven_tasks_per_node_give_the_local_world_of_this_node():
    env = {"SLURM_PROCID": "4", "SLURM_STEP_ID": "1", "SLURM_STEP_NUM_TASKS": "5", "SLURM_LOCALID": "0",
           "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "4,1", "SLURM_JOB_ID": "9",
           "SLURM_JOB_NODELIST": "a,b"}
    info = detect_rank(env)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (4, 5, 0, 1)
    assert info.master_addr == "a"


def test_batch_shell_is_a_single_process():
    # Inside the sbatch script itself (no srun step): SLURM_NTASKS=2 but this is one process.
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "vm"}
    info = detect_rank(env)
    assert (info.rank, info.world_size, info.source) == (0, 1, "single")


def test_srun_with_pmi_uses_slurm_variables():
    # `srun --mpi=pmi2` also sets PMI_RANK/PMI_SIZE; srun started every rank, so no MPI is needed.
    env = {"SLURM_PROCID": "1", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "1",
           "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "vm",
           "PMI_RANK": "1", "PMI_SIZE": "2"}
    assert detect_rank(env).source == "slurm"


def test_srun_with_pmix_uses_slurm_variables():
    # `srun --mpi=pmix` sets PMIX_RANK but no size variable: still one job of SLURM_STEP_NUM_TASKS ranks.
    env = {"SLURM_PROCID": "1", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "1",
           "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "vm", "PMIX_RANK": "1"}
    info = detect_rank(env)
    assert (info.rank, info.world_size, info.source) == (1, 2, "slurm")


@pytest.mark.parametrize("env, culprit", [
    ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "outside world size"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_ID": "1",
      "SLURM_JOB_NODELIST": "n[1-"}, "node list"),
])
def test_bad_environment_is_one_clear_error(env, culprit):
    with pytest.raises(KilnError, match=culprit.replace("[", r"\[")):
        detect_rank(env)


HOSTLISTS = {
    "vm": ["vm"],
    "gpu[001-003,7]": ["gpu001", "gpu002", "gpu003", "gpu7"],
    "n[9-11,003]": ["n9", "n10", "n11", "n003"],
    "a[1-2],b,c[09-11]": ["a1", "a2", "b", "c09", "c10", "c11"],
    "rack[1-2]-n[01-02]": ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"],
    "node[8-10]": ["node8", "node9", "node10"],
}


@pytest.mark.parametrize("nodelist", sorted(HOSTLISTS))
def test_hostlist_expansion_matches_scontrol(nodelist):
    expected = HOSTLISTS[nodelist]
    scontrol = shutil.which("scontrol")
    if scontrol and os.environ.get("SLURM_CONF"):  # the independent oracle (needs a slurm.conf, not a cluster)
        done = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True)
        if done.returncode == 0:
            expected = done.stdout.split()
    assert expand_hostlist(nodelist) == expected


def test_tasks_per_node_expansion():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("8") == [8]


WORKER = textwrap.dedent("""
    import json, os, sys
    from kiln.distributed import detect_rank, shutdown
    import torch, torch.distributed as dist
    info = detect_rank()
    dist.init_process_group("gloo", init_method="env://")
    total = torch.tensor([float(info.rank)])
    dist.all_reduce(total)
    attempt = int(os.environ.get("KILN_RESTART_COUNT", "0"))
    if sys.argv[2] == "die-once" and attempt == 0 and info.rank == 1:
        os.kill(os.getpid(), 9)  # SIGKILL: no handler, no cleanup
    with open(os.path.join(sys.argv[1], f"rank{info.rank}.json"), "w") as f:
        json.dump({**info.__dict__, "sum": total.item(), "group_size": dist.get_world_size(), "attempt": attempt}, f)
    shutdown(info)
""")


def _worker(tmp_path):
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    return path


def _ranks(tmp_path, n):
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(n)]


def _clean_env():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PMI_", "OMPI_", "PMIX_")) and k not in ("RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.timeout(180)
def test_mpiexec_workers_bootstrap_through_mpi(tmp_path):
    from kiln.launcher.local import find_mpiexec, mpiexec_command

    cmd = mpiexec_command(find_mpiexec(), 2, sys.executable, [str(_worker(tmp_path)), str(tmp_path), "ok"])
    done = run_group(cmd, env=_clean_env(), capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-2000:]
    ranks = _ranks(tmp_path, 2)
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["source"] == "mpi" and r["world_size"] == 2 and r["group_size"] == 2 for r in ranks)
    assert all(r["sum"] == 1.0 for r in ranks)  # 0 + 1: both joined one gloo group
    assert ranks[0]["master_port"] == ranks[1]["master_port"]  # rank 0's port reached rank 1 by broadcast
    assert sorted(r["local_rank"] for r in ranks) == [0, 1]


@pytest.mark.timeout(240)
def test_elastic_agent_restarts_a_killed_worker(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from kiln.launcher.local import launch_local
        sys.exit(launch_local([{str(_worker(tmp_path))!r}, {str(tmp_path)!r}, "die-once"], 2, max_restarts=1))
    """)
    done = run_group([sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True, timeout=220)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = _ranks(tmp_path, 2)
    assert all(r["attempt"] == 1 and r["source"] == "env" and r["sum"] == 1.0 for r in ranks)


@pytest.mark.timeout(240)
def test_elastic_agent_gives_up_after_max_restarts(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from kiln.launcher.local import launch_local
        sys.exit(launch_local([{str(_worker(tmp_path))!r}, {str(tmp_path)!r}, "die-once"], 2, max_restarts=0))
    """)
    done = run_group([sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True, timeout=220)
    assert done.returncode == 1
    assert "workers failed after 0 restart(s)" in done.stderr
    assert "Traceback" not in done.stderr.split("workers failed")[-1]


def test_single_process_exports_torchrun_variables(monkeypatch):
    exported = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    for name in list(os.environ):
        if name.startswith(("SLURM_", "PMI_", "OMPI_", "PMIX_")) or name in exported:
            monkeypatch.delenv(name)
    for name in exported:  # recorded as absent, so the variables detect_rank sets are removed afterwards
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    info = detect_rank()
    assert info.source == "single" and info.world_size == 1
    assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1"
    assert int(os.environ["MASTER_PORT"]) == info.master_port
    assert bootstrap.current() == info
