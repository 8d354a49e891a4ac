"""Config: defaults, includes, overrides, and validation errors that name the dotted key."""
import subprocess
import sys

import pytest

from kiln.config import load_config, resolve_world, to_yaml, from_yaml_text
from kiln.errors import ConfigError


def test_overrides_and_includes(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  d_model: 96\n  n_heads: 4\ntrain:\n  steps: 7\n")
    top = tmp_path / "top.yaml"
    top.write_text("include: [base.yaml]\ntrain:\n  steps: 9\ndata:\n  synthetic: markov\n")
    cfg = load_config([top], ["optim.lr=0.01"])
    assert (cfg.model.d_model, cfg.train.steps, cfg.optim.lr) == (96, 9, 0.01)
    assert from_yaml_text(to_yaml(cfg)) == cfg


@pytest.mark.parametrize("override,key", [
    (["model.n_heads=3"], "model.d_model"),
    (["parallel.tp=3"], "parallel.tp"),
    (["model.n_kv_heads=2", "parallel.tp=4"], "parallel.tp"),
    (["parallel.pp=3"], "parallel.pp"),
    (["model.bogus=1"], "model.bogus"),
    (["train.steps=many"], "train.steps"),
    (["model.attention=fast"], "model.attention"),
    (["parallel.engine=deepspeed", "parallel.tp=2"], "parallel.engine"),
    (["data.seq_len=4096"], "data.seq_len"),
    (["logging.log_every=0"], "logging.log_every"),
    (["train.eval_steps=0"], "train.eval_steps"),
    (["train.global_batch_tokens=0"], "train.global_batch_tokens"),
    (["optim.wsd_decay_fraction=0"], "optim.wsd_decay_fraction"),
])
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config([], ["data.synthetic=markov", *override])
    assert key in str(err.value)


def test_world_size_must_match_mesh():
    cfg = load_config([], ["data.synthetic=markov", "parallel.tp=2", "parallel.dp_shard=2"])
    assert resolve_world(cfg, 4)["dp_shard"] == 2
    with pytest.raises(ConfigError, match="world size 8"):
        resolve_world(cfg, 8)
    cfg = load_config([], ["data.synthetic=markov", "parallel.tp=2"])
    assert resolve_world(cfg, 8)["dp_shard"] == 4


def test_cli_config_error_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", "train", "data.synthetic=markov", "parallel.tp=3",
                           f"train.run_dir={tmp_path}"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "parallel.tp" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_data_paths_are_saved_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config([], ["data.path=corpus", "data.mixture=[{path: a, weight: 2.0}]", "checkpoint.init_from=ck"])
    assert cfg.data.path == str(tmp_path / "corpus")
    assert (cfg.data.mixture[0].path, cfg.data.mixture[0].weight) == (str(tmp_path / "a"), 2.0)
    assert cfg.checkpoint.init_from == str(tmp_path / "ck")


def test_mixture_entries_are_typed():
    with pytest.raises(ConfigError, match="data.mixture"):
        load_config([], ["data.mixture=[{path: a, weight: heavy}]"])
