"""`kiln submit`: render an sbatch script from a template, save it with the config, call sbatch.

Launch model: one Slurm task per GPU (per process on CPU). `srun` starts every worker directly and
each finds its rank from SLURM_* variables (kiln.distributed.rank), so there is no second launcher
layer, and Slurm's `--signal` reaches every worker. On the signal the workers checkpoint and exit, and
rank 0 runs `scontrol requeue`; the requeued job resumes from `checkpoints/latest`.

Safety: the script is shell, so every value from the config is either checked against a strict
pattern (values on `#SBATCH` lines, which sbatch reads without a shell) or passed through
`shlex.quote` (values in shell commands). No config value can add a line or a command.
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kiln.config import SBATCH_FIELDS, SBATCH_NAME, Config, ConfigError, run_dir_of, save_run_config
from kiln.distributed import parallel_dims
from kiln.errors import KilnError

SCRIPT_NAME = "submit.sbatch"
JOB_ID_FILE = "slurm_job_id"

DEFAULT_TEMPLATE = """\
#!/bin/bash
# Rendered by `kiln submit` ({{template}}). To change it, copy the template, edit it, and set
# cluster.template: path/to/it.sbatch
{{sbatch_directives}}

set -eo pipefail
{{modules}}
# Rank bootstrap (kiln.distributed.rank) reads SLURM_PROCID/SLURM_LOCALID/SLURM_STEP_NODELIST;
# the master is the first node, the port is derived from the job id.
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS={{omp_threads}}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
{{env}}
cd {{workdir}}
echo "kiln: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}: {{world_size}} workers"
# On SIGUSR1 (sent --signal's grace period before the time limit) the workers save a checkpoint and
# exit; rank 0 requeues the job, and the next start resumes from checkpoints/latest.
srun {{srun_args}} {{python}} -m kiln.cli train {{config}}
"""

# The cluster fields were checked when the config loaded (kiln.config.SBATCH_FIELDS); paths are checked here.
NAME_RE = re.compile(SBATCH_NAME)
PATH_BAD_RE = re.compile(r"[\s'\"\\%$`]|[\x00-\x1f\x7f]")
PLACEHOLDER_RE = re.compile(r"{{\s*([A-Za-z_][A-Za-z0-9_]*)\s*}}")


def _directive_value(key: str, value: object, pattern: re.Pattern, what: str) -> str:
    text = str(value)
    if not pattern.fullmatch(text):
        raise ConfigError(key, f"{text!r} is not a valid {what} (it would be written on an #SBATCH line)")
    return text


def _safe_path(key: str, path: Path) -> str:
    text = str(path)
    if PATH_BAD_RE.search(text):
        raise ConfigError(key, f"path {text!r} contains whitespace, quotes, '%', '$' or control characters, "
                               "which an #SBATCH line cannot hold")
    return text


def tasks_per_node(cfg: Config) -> int:
    """One task per GPU; on CPU nodes cluster.nproc_per_node (default 1)."""
    c = cfg.cluster
    return c.nproc_per_node or c.gpus_per_node or 1


@dataclass
class Rendered:
    script: str
    run_dir: Path
    script_path: Path
    config_path: Path
    log_pattern: str
    world_size: int


def _directives(cfg: Config, run_dir: Path, ntasks: int) -> list[str]:
    c = cfg.cluster
    lines = [f"--job-name={_directive_value('train.name', cfg.train.name, NAME_RE, 'Slurm job name')}",
             f"--nodes={c.nodes}", f"--ntasks-per-node={ntasks}"]
    if c.gpus_per_node:
        lines.append(f"--gpus-per-node={c.gpus_per_node}")
    if c.cpus_per_task is not None:
        lines.append(f"--cpus-per-task={c.cpus_per_task}")
    for key in SBATCH_FIELDS:
        value = getattr(c, key)
        if value not in (None, ""):
            lines.append(f"--{key}={value}")
    if c.exclusive:
        lines.append("--exclusive")
    lines.append(f"--output={_safe_path('train.run_dir', run_dir)}/slurm-%j.out")
    lines.append("--open-mode=append")  # a requeued job appends to the same log
    if c.requeue:
        lines += ["--requeue", f"--signal=USR1@{int(c.signal_grace_s)}"]
    else:
        lines.append("--no-requeue")
    return [f"#SBATCH {line}" for line in lines]


def _env_lines(cfg: Config) -> list[str]:
    lines = []
    for key, value in (cfg.cluster.env or {}).items():
        lines.append(f"export {key}={shlex.quote(str(value))}")
    return lines


def _srun_args(cfg: Config, ntasks: int, workdir: Path, run_dir: Path) -> str:
    args = ["--kill-on-bad-exit=1", f"--ntasks-per-node={ntasks}"]
    image = cfg.cluster.container_image
    if image:  # pyxis/enroot; code, run directory, data and init checkpoint mounted at the same paths
        paths = {str(workdir), str(run_dir), *(m.path for m in cfg.data.mixture)}
        paths |= {p for p in (cfg.data.path, cfg.checkpoint.init_from) if p}
        mounts = ",".join(sorted(paths))
        args += [f"--container-image={image}", f"--container-mounts={mounts}", f"--container-workdir={workdir}"]
    return " ".join(shlex.quote(a) for a in args)


def render(cfg: Config, python: Optional[str] = None, workdir: Optional[Path] = None) -> Rendered:
    """Render the sbatch script for `cfg` (nothing is written)."""
    ntasks = tasks_per_node(cfg)
    world = cfg.cluster.nodes * ntasks
    parallel_dims(cfg, world)  # layout errors surface now, not after the job waited in the queue
    run_dir = run_dir_of(cfg)
    workdir = (workdir or Path.cwd()).resolve()
    python = python or ("python3" if cfg.cluster.container_image else sys.executable)
    template_path = cfg.cluster.template
    if template_path:
        try:
            template = Path(template_path).read_text()
        except OSError as exc:
            raise ConfigError("cluster.template", f"cannot read {template_path}: {exc.strerror}") from None
    else:
        template = DEFAULT_TEMPLATE
    config_path = run_dir / "config.yaml"
    q = shlex.quote
    values = {
        "template": template_path or "kiln default template",
        "sbatch_directives": "\n".join(_directives(cfg, run_dir, ntasks)),
        "modules": "\n".join(f"module load {q(str(m))}" for m in cfg.cluster.modules),
        "env": "\n".join(_env_lines(cfg)),
        "omp_threads": str(cfg.cluster.cpus_per_task or 1),
        "workdir": q(str(workdir)),
        "run_dir": q(str(run_dir)),
        "config": q(str(config_path)),
        "python": q(python),
        "srun_args": _srun_args(cfg, ntasks, workdir, run_dir),
        "world_size": str(world),
        "nodes": str(cfg.cluster.nodes),
        "tasks_per_node": str(ntasks),
        "gpus_per_node": str(cfg.cluster.gpus_per_node),
        "job_name": _directive_value("train.name", cfg.train.name, NAME_RE, "Slurm job name"),
    }
    if "\n" in values["template"] or "\n" in values["python"]:
        raise ConfigError("cluster.template", "must be a single-line path")

    def fill(m: re.Match) -> str:
        name = m.group(1)
        if name not in values:
            raise ConfigError("cluster.template", f"unknown placeholder {{{{{name}}}}}; known: {', '.join(sorted(values))}")
        return values[name]

    script = PLACEHOLDER_RE.sub(fill, template)
    return Rendered(script, run_dir, run_dir / SCRIPT_NAME, config_path, str(run_dir / "slurm-%j.out"), world)


def write(cfg: Config, rendered: Rendered) -> None:
    rendered.run_dir.mkdir(parents=True, exist_ok=True)
    save_run_config(cfg)
    rendered.script_path.write_text(rendered.script)
    rendered.script_path.chmod(0o755)


def sbatch(script_path: Path, workdir: Optional[Path] = None) -> str:
    """Submit with `sbatch --parsable`; return the job id. Missing or refusing sbatch -> KilnError."""
    exe = shutil.which("sbatch")
    if exe is None:
        raise KilnError("sbatch not found on PATH (not a Slurm login node?); use --dry-run to see the script")
    try:
        done = subprocess.run([exe, "--parsable", str(script_path)], capture_output=True, text=True,
                              cwd=workdir, timeout=120)
    except subprocess.TimeoutExpired:
        raise KilnError("sbatch did not answer within 120 s (is slurmctld up?)") from None
    if done.returncode != 0:
        reason = " ".join((done.stderr or done.stdout).split()) or f"exit status {done.returncode}"
        raise KilnError(f"sbatch refused the job: {reason}")
    job_id = done.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise KilnError(f"sbatch answered {done.stdout.strip()!r}, not a job id")
    return job_id


def submit(cfg: Config, dry_run: bool = False) -> tuple[Rendered, Optional[str]]:
    rendered = render(cfg)
    if dry_run:
        return rendered, None
    write(cfg, rendered)
    job_id = sbatch(rendered.script_path, Path.cwd())
    (rendered.run_dir / JOB_ID_FILE).write_text(job_id + "\n")
    return rendered, job_id
