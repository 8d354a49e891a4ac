"""Experiment trackers (Weights & Biases, MLflow): the metrics of metrics.jsonl and the resolved config.

Rank 0 only, driven by `MetricsLogger`. Each tracker's run id is kept in `<run_dir>/trackers.json`,
so a resumed run (same run directory) continues the same tracker run instead of starting a new one.
Keys are `<prefix>/<field>` as in TensorBoard (`train/loss`, `eval/eval_loss`), at the record's step.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from kiln.config import Config, as_dict

STATE_FILE = "trackers.json"


def _scalars(record: dict, prefix: str) -> dict[str, float]:
    return {f"{prefix}/{k}": float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: str(tree)[:500]}  # MLflow caps parameter values at 500 characters


class WandbTracker:
    def __init__(self, cfg: Config, run_dir: Path, run_id: Optional[str]):
        import wandb

        w = cfg.logging.wandb
        self.run = wandb.init(project=w.project, entity=w.entity, name=w.name or cfg.train.name, tags=list(w.tags),
                              mode=w.mode, dir=w.dir or str(run_dir), id=run_id, resume="allow" if run_id else None)
        self.run.config.update(as_dict(cfg), allow_val_change=True)
        self.run_id = self.run.id

    def log(self, record: dict, prefix: str) -> None:
        self.run.log(_scalars(record, prefix), step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, cfg: Config, run_dir: Path, run_id: Optional[str]):
        from mlflow import MlflowClient

        m = cfg.logging.mlflow
        uri = m.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):  # MLflow 3 keeps its file store behind this switch
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        if run_id is None:
            exp = self.client.get_experiment_by_name(m.experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(m.experiment)
            run = self.client.create_run(exp_id, run_name=m.run_name or cfg.train.name, tags=dict(m.tags))
            run_id = run.info.run_id
            params = _flatten(as_dict(cfg))
            items = list(params.items())
            for i in range(0, len(items), 100):  # MLflow's batch limit
                self.client.log_batch(run_id, params=[_param(k, v) for k, v in items[i:i + 100]])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        self.client.log_dict(run_id, as_dict(cfg), "config.yaml")

    def log(self, record: dict, prefix: str) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, int(record["step"])) for k, v in _scalars(record, prefix).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _param(key: str, value: str):
    from mlflow.entities import Param

    return Param(key, value)


TRACKERS = {"wandb": WandbTracker, "mlflow": MlflowTracker}


def open_trackers(cfg: Config, run_dir: Path) -> list:
    """Start (or continue, by the ids in trackers.json) every tracker the config turns on."""
    enabled = [name for name in TRACKERS if getattr(cfg.logging, name) is not None]
    if not enabled:
        return []
    path = run_dir / STATE_FILE
    state = json.loads(path.read_text()) if path.is_file() else {}
    trackers = []
    for name in enabled:
        tracker = TRACKERS[name](cfg, run_dir, state.get(name))
        state[name] = tracker.run_id
        trackers.append(tracker)
    tmp = path.with_name(f".{STATE_FILE}.tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)
    return trackers
