"""Verbs `kiln launch` (local processes or mpiexec), `kiln submit` (Slurm) and `kiln status`.

Command-line flags are written into the config's `cluster` section (after the YAML files and
key=value overrides), so the saved config.yaml records how the job was launched.
"""
from __future__ import annotations

import argparse
import json
import sys

from kiln.cli import add_config_args, load_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("launch", help="run N training workers on this machine (elastic agent or mpiexec)",
                       description="Start N workers of `kiln train` on this machine. Failed workers are "
                                   "restarted (--max-restarts) and resume from checkpoints/latest.")
    add_config_args(p)
    p.add_argument("--nproc", type=int, default=None,
                   help="workers (default: cluster.nproc_per_node, else cluster.gpus_per_node, else 1)")
    p.add_argument("--launcher", choices=("local", "mpi"), default=None,
                   help="local: torch elastic agent; mpi: mpiexec -n N (default: cluster.launcher, else local)")
    p.add_argument("--max-restarts", type=int, default=None, help="restart failed workers up to K times "
                   "(default: cluster.max_restarts)")
    p.add_argument("--mpiexec", default=None, help="mpiexec to use (default: beside this Python, then PATH)")
    p.add_argument("--json", action="store_true", help="print {exit_code, nproc, launcher, run_dir} as JSON at the end")
    p.set_defaults(func=_launch)

    s = sub.add_parser("submit", help="render an sbatch script into the run directory and submit it to Slurm",
                       description="Render <run_dir>/submit.sbatch (one task per GPU, srun), save the resolved "
                                   "config beside it and submit with sbatch. --dry-run prints the script only.")
    add_config_args(s)
    s.add_argument("--nodes", type=int, help="cluster.nodes")
    s.add_argument("--gpus-per-node", type=int, help="cluster.gpus_per_node (one task per GPU)")
    s.add_argument("--nproc-per-node", type=int, help="cluster.nproc_per_node (tasks per node on CPU nodes)")
    for flag in ("partition", "account", "qos", "constraint", "time", "template", "container-image"):
        s.add_argument(f"--{flag}", help=f"cluster.{flag.replace('-', '_')}")
    s.add_argument("--cpus-per-task", type=int, help="cluster.cpus_per_task")
    s.add_argument("--exclusive", action="store_true", default=None, help="cluster.exclusive=true")
    s.add_argument("--no-requeue", dest="requeue", action="store_false", default=None,
                   help="cluster.requeue=false: no --requeue and no checkpoint signal")
    s.add_argument("--signal-grace", type=int, dest="signal_grace_s", help="cluster.signal_grace_s: seconds "
                   "before the time limit at which workers checkpoint and requeue")
    s.add_argument("--dry-run", action="store_true", help="print the script, write and submit nothing")
    s.add_argument("--json", action="store_true", help="print {job_id, script, run_dir, log} as JSON")
    s.set_defaults(func=_submit)

    st = sub.add_parser("status", help="show a run's Slurm job state and latest metrics",
                        description="RUN is a run directory (or a name under runs/).")
    st.add_argument("run", metavar="RUN")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_status)


def _launch(args) -> int:
    from kiln.launcher.local import launch_local, launch_mpi, prepare_run, worker_args

    cfg = load_from_args(args)
    launcher = args.launcher or (cfg.cluster.launcher if cfg.cluster.launcher in ("local", "mpi") else "local")
    nproc = args.nproc if args.nproc is not None else (cfg.cluster.nproc_per_node or cfg.cluster.gpus_per_node or 1)
    restarts = args.max_restarts if args.max_restarts is not None else cfg.cluster.max_restarts
    cfg.cluster.launcher, cfg.cluster.nproc_per_node, cfg.cluster.max_restarts = launcher, nproc, restarts
    config_path = prepare_run(cfg, nproc)
    print(f"kiln: launching {nproc} worker(s) with {launcher}; run directory {config_path.parent}", flush=True)
    if launcher == "mpi":
        code = launch_mpi(worker_args(config_path), nproc, restarts, mpiexec=args.mpiexec)
    else:
        code = launch_local(worker_args(config_path), nproc, restarts)
    if args.json:
        print(json.dumps({"exit_code": code, "nproc": nproc, "launcher": launcher, "run_dir": str(config_path.parent)}))
    return code


def _apply_submit_flags(cfg, args) -> None:
    c = cfg.cluster
    c.launcher = "slurm"
    for name in ("nodes", "gpus_per_node", "nproc_per_node", "partition", "account", "qos", "constraint",
                 "template", "container_image", "cpus_per_task", "exclusive", "requeue", "signal_grace_s"):
        value = getattr(args, name)
        if value is not None:
            setattr(c, name, value)
    if args.time is not None:
        c.time = f"{args.time}:00" if args.time.isdigit() else args.time  # a bare --time N means N minutes


def _submit(args) -> int:
    from kiln.launcher.slurm import submit

    cfg = load_from_args(args)
    _apply_submit_flags(cfg, args)
    rendered, job_id = submit(cfg, dry_run=args.dry_run)
    log = rendered.log_pattern.replace("%j", job_id or "<job id>")
    if args.json:
        print(json.dumps({"job_id": job_id, "script": str(rendered.script_path), "run_dir": str(rendered.run_dir),
                          "log": log, "world_size": rendered.world_size, "dry_run": args.dry_run,
                          **({"script_text": rendered.script} if args.dry_run else {})}))
    elif args.dry_run:
        sys.stdout.write(rendered.script)
    else:
        print(f"submitted job {job_id}: {rendered.world_size} workers; script {rendered.script_path}")
        print(f"  follow the log:  tail -f {log}")
        print(f"  job and metrics: kiln status {rendered.run_dir}")
    return 0


def _status(args) -> int:
    from kiln.launcher.status import format_status, run_status

    info = run_status(args.run)
    print(json.dumps(info) if args.json else format_status(info))
    return 0
