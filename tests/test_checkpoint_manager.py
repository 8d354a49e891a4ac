"""Crash safety of checkpoints: an interrupted save never moves `latest`; a damaged checkpoint is
refused by name and resume falls back to the previous good one; keep_last prunes; async equals sync."""
import json

import pytest
import torch

import kiln.checkpoint.manager as manager
from kiln.checkpoint.manager import CheckpointManager, check_checkpoint, find_resumable
from kiln.config import load_config
from kiln.errors import KilnError
from kiln.train import train

TINY = ["model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=64",
        "data.synthetic=markov", "logging.tensorboard=false", "logging.progress=false", "train.eval_every=0",
        "data.seq_len=16", "train.micro_batch=2", "logging.log_every=1"]


def _cfg(tmp_path, *extra):
    return load_config([], [*TINY, f"train.run_dir={tmp_path}", *extra])


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_save_killed_mid_write_leaves_latest_on_previous(tmp_path, monkeypatch):
    train(_cfg(tmp_path, "train.steps=4", "checkpoint.every=2"))
    ckpts = tmp_path / "default" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    real_save = manager.dcp.save

    def dying_save(state, storage_writer, **kw):
        real_save(state, storage_writer=storage_writer, **kw)
        # half the shard file survives, like a node lost mid-write; the process dies before meta.json
        directory = __import__("pathlib").Path(storage_writer.path)
        data = next(p for p in sorted(directory.iterdir()) if p.suffix == ".distcp")
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(manager.dcp, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path, "train.steps=8", "checkpoint.every=2"))
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    assert find_resumable(ckpts).name == "step_00000004"
    monkeypatch.setattr(manager.dcp, "save", real_save)
    assert train(_cfg(tmp_path, "train.steps=8", "checkpoint.every=2"))["step"] == 8


def test_damaged_checkpoint_is_refused_and_resume_falls_back(tmp_path):
    train(_cfg(tmp_path, "train.steps=6", "checkpoint.every=2", "checkpoint.keep_last=3"))
    ckpts = tmp_path / "default" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000002", "step_00000004", "step_00000006"]
    newest = ckpts / "step_00000006"
    part = next(p for p in newest.iterdir() if p.suffix == ".distcp")
    part.write_bytes(part.read_bytes()[:100])
    with pytest.raises(KilnError, match=f"{part.name} is truncated"):
        check_checkpoint(newest)
    assert find_resumable(ckpts).name == "step_00000004"
    (ckpts / "step_00000004" / "meta.json").unlink()
    with pytest.raises(KilnError, match="incomplete"):
        check_checkpoint(ckpts / "step_00000004")
    assert find_resumable(ckpts).name == "step_00000002"


def test_keep_last_prunes_old_checkpoints(tmp_path):
    train(_cfg(tmp_path, "train.steps=8", "checkpoint.every=2", "checkpoint.keep_last=2"))
    ckpts = tmp_path / "default" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000006", "step_00000008"]


def test_async_save_matches_sync_and_resumes(tmp_path):
    import shutil

    for mode in ("sync", "async"):
        train(_cfg(tmp_path / mode, "train.steps=6", "checkpoint.every=3",
                   f"checkpoint.async_save={'true' if mode == 'async' else 'false'}"))
    a, b = (CheckpointManager(tmp_path / m / "default") for m in ("sync", "async"))
    assert a.find_resumable().name == b.find_resumable().name == "step_00000006"
    from kiln.model import Transformer

    cfg = _cfg(tmp_path)
    models = [Transformer(cfg.model), Transformer(cfg.model)]
    for m, mgr in zip(models, (a, b)):
        mgr.load_weights(mgr.find_resumable(), [m], None)
    for (n, p), (_, q) in zip(models[0].named_parameters(), models[1].named_parameters()):
        assert torch.equal(p, q), n
    # resume the async run from its step-3 checkpoint: same losses as the uninterrupted run
    run = tmp_path / "async" / "default"
    shutil.copytree(run, tmp_path / "resumed" / "default")
    ck = tmp_path / "resumed" / "default" / "checkpoints"
    shutil.rmtree(ck / "step_00000006")
    (ck / "latest").write_text("step_00000003\n")
    (tmp_path / "resumed" / "default" / "metrics.jsonl").write_text("")
    train(_cfg(tmp_path / "resumed", "train.steps=6", "checkpoint.every=3", "checkpoint.async_save=true"))
    full, resumed = _losses(run), _losses(tmp_path / "resumed" / "default")
    assert all(full[s] == resumed[s] for s in (4, 5, 6))


def test_crash_between_resave_renames_falls_back_to_the_kept_copy(tmp_path):
    train(_cfg(tmp_path, "train.steps=4", "checkpoint.every=2", "checkpoint.keep_last=3"))
    ckpts = tmp_path / "default" / "checkpoints"
    (ckpts / "step_00000004").rename(ckpts / "step_00000004.old")  # moved aside, new copy never arrived
    found = find_resumable(ckpts)
    assert found.name == "step_00000004.old"
    assert train(_cfg(tmp_path, "train.steps=6", "checkpoint.every=2", "checkpoint.keep_last=3"))["step"] == 6
    assert not list(ckpts.glob("*.old"))  # pruned once a newer checkpoint is complete
