"""`kiln submit` rendering: directives of a multi-node GPU job, and quoting.

The quoting oracle is bash itself: the rendered script is executed with stand-in `srun` and
`module` commands that record exactly what they receive. Hostile config values must arrive as
literal text and must never run.
"""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.config import ConfigError, load_config
from kiln.errors import KilnError
from kiln.launcher import slurm

REPO = Path(__file__).resolve().parent.parent
GPU_PROFILE = REPO / "configs" / "cluster" / "gpu-example.yaml"
BASE = ["data.synthetic=markov", "model.vocab_size=64", "model.d_model=64", "model.n_layers=2", "model.n_heads=4"]


def _cfg(tmp_path, *overrides, profile=GPU_PROFILE):
    return load_config([profile], [*BASE, f"train.run_dir={tmp_path / 'runs'}", "train.name=gpt-8b_run.1",
                                   *overrides])


def directives(script: str) -> list[str]:
    """The options sbatch reads: `#SBATCH` lines before the first command (sbatch stops there)."""
    out = []
    for line in script.splitlines()[1:]:
        if line.startswith("#SBATCH"):
            out.append(line[len("#SBATCH "):])
        elif line.strip() and not line.startswith("#"):
            break
    return out


def test_multi_node_gpu_job_directives(tmp_path):
    cfg = _cfg(tmp_path, "cluster.nodes=4")
    r = slurm.render(cfg, python="/opt/venv/bin/python", workdir=tmp_path)
    run_dir = (tmp_path / "runs" / "gpt-8b_run.1").resolve()
    assert r.world_size == 32
    assert directives(r.script) == [
        "--job-name=gpt-8b_run.1", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=12",
        "--partition=gpu", "--account=my-project", "--qos=normal", "--constraint=h100", "--time=2-00:00:00",
        "--exclusive", f"--output={run_dir}/slurm-%j.out", "--open-mode=append", "--requeue", "--signal=USR1@300"]
    srun = [line for line in r.script.splitlines() if line.startswith("srun ")]
    assert srun == [f"srun --kill-on-bad-exit=1 --ntasks-per-node=8 /opt/venv/bin/python -m kiln.cli train "
                    f"{run_dir}/config.yaml"]
    assert "module load cuda/12.4" in r.script and "export NCCL_SOCKET_IFNAME='^lo,docker'" in r.script
    assert subprocess.run(["bash", "-n"], input=r.script, text=True).returncode == 0


def test_no_requeue_drops_the_signal(tmp_path):
    r = slurm.render(_cfg(tmp_path, "cluster.requeue=false"), workdir=tmp_path)
    d = directives(r.script)
    assert "--no-requeue" in d and not any(x.startswith(("--signal", "--requeue")) for x in d)


def test_layout_is_checked_against_the_job_size(tmp_path):
    with pytest.raises(ConfigError, match="parallel"):
        slurm.render(_cfg(tmp_path, "parallel.tp=4", "parallel.dp_shard=3"), workdir=tmp_path)


HOSTILE = "$(touch PWNED) `touch PWNED2`; touch PWNED3 'single' \"double\" \\ \n#SBATCH --uid=0"


def _fake_bin(tmp_path) -> Path:
    """srun/module stand-ins that record their arguments, cwd and environment as JSON."""
    fake = tmp_path / "fakebin"
    fake.mkdir()
    recorder = (f"#!{sys.executable}\n"
                "import json, os, sys\n"
                "with open(os.environ['RECORD'], 'a') as f:\n"
                "    f.write(json.dumps({'argv': sys.argv, 'cwd': os.getcwd(), 'env': dict(os.environ)}) + '\\n')\n")
    for name in ("srun", "module"):
        (fake / name).write_text(recorder)
        (fake / name).chmod(stat.S_IRWXU)
    return fake


def test_hostile_values_reach_commands_literally_and_never_run(tmp_path):
    workdir = tmp_path / "my work dir $HOME"
    workdir.mkdir()
    cfg = _cfg(tmp_path, profile=GPU_PROFILE)
    cfg.cluster.env = {"WEIRD": HOSTILE, "NCCL_DEBUG": "INFO"}
    cfg.cluster.modules = ["cuda/12.4; touch PWNED4"]
    cfg.cluster.container_image = "nvcr.io#nvidia/pytorch:25.01-py3 $(touch PWNED5)"
    r = slurm.render(cfg, python=sys.executable, workdir=workdir)
    script = tmp_path / "job.sbatch"
    script.write_text(r.script)
    record = tmp_path / "record.jsonl"
    env = {"PATH": f"{_fake_bin(tmp_path)}:{os.environ['PATH']}", "RECORD": str(record), "HOME": "/nonexistent",
           "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "gpu[01-04]"}
    done = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    module, srun = calls
    assert module["argv"][1:] == ["load", "cuda/12.4; touch PWNED4"]
    assert srun["env"]["WEIRD"] == HOSTILE
    assert srun["env"]["NCCL_DEBUG"] == "INFO"  # the profile's env overrides kiln's default
    assert srun["cwd"] == str(workdir)
    assert "--container-image=nvcr.io#nvidia/pytorch:25.01-py3 $(touch PWNED5)" in srun["argv"]
    assert srun["argv"][-4:] == ["-m", "kiln.cli", "train", str(r.config_path)]
    assert not list(tmp_path.rglob("PWNED*"))
    assert not any("uid" in d for d in directives(r.script))


@pytest.mark.parametrize("override, key", [
    ("cluster.partition='gpu\n#SBATCH --uid=0'", "cluster.partition"),
    ("cluster.partition='gpu; reboot'", "cluster.partition"),
    ("cluster.account='a b'", "cluster.account"),
    ("cluster.qos='$(id)'", "cluster.qos"),
    ("cluster.constraint='h100\nrm -rf /'", "cluster.constraint"),
    ("cluster.time='1:00:00; reboot'", "cluster.time"),
    ("cluster.time=12:00:00", "cluster.time"),  # YAML made it 43200: refused, not guessed
    ("train.name='x\ny'", "train.name"),
    ("train.name='run name'", "train.name"),
    ("cluster.env={'A;B': '1'}", "cluster.env"),
    ("cluster.signal_grace_s=-5", "cluster.signal_grace_s"),
])
def test_values_that_could_escape_a_directive_are_refused(tmp_path, override, key):
    with pytest.raises(ConfigError) as err:
        slurm.render(_cfg(tmp_path, override), workdir=tmp_path)
    assert err.value.key.startswith(key)


def test_run_dir_that_an_sbatch_line_cannot_hold_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="train.run_dir"):
        slurm.render(load_config([GPU_PROFILE], [*BASE, f"train.run_dir={tmp_path}/a b"]), workdir=tmp_path)


def test_user_template_and_unknown_placeholder(tmp_path):
    template = tmp_path / "site.sbatch"
    template.write_text("#!/bin/bash\n{{sbatch_directives}}\n#SBATCH --mem=0\nsrun {{python}} -m kiln.cli train "
                        "{{config}}  # {{world_size}} workers\n")
    r = slurm.render(_cfg(tmp_path, f"cluster.template={template}"), python="python3", workdir=tmp_path)
    assert directives(r.script)[-1] == "--mem=0"
    assert r.script.rstrip().endswith("# 16 workers")
    template.write_text("#!/bin/bash\nsrun {{pyhton}}\n")
    with pytest.raises(ConfigError, match="pyhton"):
        slurm.render(_cfg(tmp_path, f"cluster.template={template}"), workdir=tmp_path)
    with pytest.raises(ConfigError, match="cluster.template"):
        slurm.render(_cfg(tmp_path, f"cluster.template={tmp_path}/missing.sbatch"), workdir=tmp_path)


def _run_cli(args, tmp_path, path_env):
    env = {**os.environ, "PATH": path_env}
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


def test_dry_run_prints_the_script_and_writes_nothing(tmp_path):
    done = _run_cli(["submit", str(GPU_PROFILE), *BASE, f"train.run_dir={tmp_path}/runs", "--nodes", "2",
                     "--partition", "big", "--time", "90", "--dry-run"], tmp_path, os.environ["PATH"])
    assert done.returncode == 0, done.stderr
    d = directives(done.stdout)
    assert "--nodes=2" in d and "--partition=big" in d and "--time=90:00" in d
    assert not (tmp_path / "runs").exists()


def test_missing_sbatch_is_one_clear_line(tmp_path):
    bare = tmp_path / "bin"
    bare.mkdir()
    done = _run_cli(["submit", str(GPU_PROFILE), *BASE, f"train.run_dir={tmp_path}/runs"], tmp_path, str(bare))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "kiln: sbatch not found on PATH (not a Slurm login node?); use --dry-run to see the script"]


def test_refusing_sbatch_reports_its_reason(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: Batch job submission failed: Invalid account' >&2\n"
                                 "exit 1\n")
    (fake / "sbatch").chmod(stat.S_IRWXU)
    done = _run_cli(["submit", str(GPU_PROFILE), *BASE, f"train.run_dir={tmp_path}/runs"], tmp_path,
                    f"{fake}:{os.environ['PATH']}")
    assert done.returncode == 2
    assert "sbatch refused the job: sbatch: error: Batch job submission failed: Invalid account" in done.stderr
    assert "Traceback" not in done.stderr


def test_sbatch_function_parses_the_job_id(tmp_path, monkeypatch):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text("#!/bin/sh\necho '4242;cluster-a'\n")
    (fake / "sbatch").chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    assert slurm.sbatch(tmp_path / "x.sbatch") == "4242"
    (fake / "sbatch").write_text("#!/bin/sh\necho 'Submitted batch job 1'\n")
    with pytest.raises(KilnError, match="not a job id"):
        slurm.sbatch(tmp_path / "x.sbatch")
