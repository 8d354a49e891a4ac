"""Experiment trackers against the real libraries, offline: W&B's offline run files and an MLflow file
store hold the metrics of metrics.jsonl and the resolved config; a resumed run continues the same run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kiln.config import as_dict, load_config
from kiln.errors import ConfigError
from kiln.train import train

wandb = pytest.importorskip("wandb")
mlflow = pytest.importorskip("mlflow")

TINY = ["model.vocab_size=64", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "data.synthetic=markov",
        "data.synthetic_vocab=16", "data.seq_len=16", "train.micro_batch=4", "train.device=cpu",
        "train.eval_every=3", "train.eval_steps=1", "logging.log_every=1", "logging.tensorboard=false",
        "logging.progress=false", "checkpoint.every=3", "train.name=tracked"]


def _wandb_records(path: Path):
    """Records of a W&B transaction log (.wandb): a ':W&B' header, then LevelDB-log framed protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks, partial, block = 7, [], b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            partial = chunk
        elif kind == 3:
            partial += chunk
        elif kind == 4:
            chunks.append(partial + chunk)
    for chunk in chunks:
        record = pb.Record()
        record.ParseFromString(chunk)
        yield record


def _expected(run_dir: Path) -> dict:
    """(key, step) -> value from metrics.jsonl, named as the trackers name them."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        prefix = "eval" if "eval_loss" in r else "train"
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)):
                out[(f"{prefix}/{k}", r["step"])] = float(v)
    return out


def test_wandb_offline_and_mlflow_file_store_follow_metrics_and_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    extra = [f"train.run_dir={tmp_path}", "logging.wandb.mode=offline", "logging.wandb.project=kiln-test",
             "logging.wandb.tags=[tiny,ci]", "logging.mlflow.experiment=kiln-test", "logging.mlflow.tags.team=core"]
    train(load_config([], [*TINY, *extra, "train.steps=3"]))
    cfg = load_config([], [*TINY, *extra, "train.steps=6"])
    train(cfg)  # resumes from step 3
    run_dir = tmp_path / "tracked"
    ids = json.loads((run_dir / "trackers.json").read_text())
    expected = _expected(run_dir)
    assert ("train/loss", 6) in expected and ("eval/eval_loss", 3) in expected

    # W&B: two offline segments of one run id, together holding every metric at its step.
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{ids['wandb']}.wandb" for f in files)
    got, runs, config = {}, [], {}
    for f in files:
        for rec in _wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                got.update({(k, rec.history.step.num): v for k, v in items.items() if not k.startswith("_")})
            elif kind == "run":
                runs.append(rec.run)
            elif kind == "config":
                config.update({u.key: json.loads(u.value_json) for u in rec.config.update})
    assert got == pytest.approx(expected)
    assert runs[0].project == "kiln-test" and runs[0].display_name == "tracked" and list(runs[0].tags) == ["tiny", "ci"]
    assert {k: v for k, v in config.items() if k != "_wandb"} == as_dict(cfg)

    # MLflow: one run in the file store with the same metrics, tags, params and the config artifact.
    client = mlflow.MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    run = client.get_run(ids["mlflow"])
    assert run.info.run_name == "tracked" and run.data.tags["team"] == "core" and run.info.status == "FINISHED"
    assert run.data.params["train.name"] == "tracked" and run.data.params["model.d_model"] == "64"
    got = {(k, m.step): m.value for k in run.data.metrics for m in client.get_metric_history(run.info.run_id, k)}
    assert got == pytest.approx(expected)
    assert len(client.search_runs([run.info.experiment_id])) == 1
    art = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path / "art")))
    assert yaml.safe_load(art.read_text()) == as_dict(cfg)


def test_tracker_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="logging.wandb.mode"):
        load_config([], [*TINY, "logging.wandb.mode=cloud"])
