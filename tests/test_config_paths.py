"""Config paths resolve from the working directory first, then kiln's bundled configs (in any install)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.config import CONFIG_DIR, load_config
from kiln.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_bundled_configs_load_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reference = load_config([CONFIG_DIR / "train" / "quickstart.yaml"])
    for name in ("configs/train/quickstart.yaml", "train/quickstart.yaml"):
        cfg = load_config([name])
        assert cfg == reference and cfg.train.name == "quickstart"
        assert cfg.data.path == str(tmp_path / "data" / "stdlib")  # outputs stay relative to the cwd
    # A file in the working directory wins over the bundled one of the same name.
    (tmp_path / "configs" / "train").mkdir(parents=True)
    (tmp_path / "configs" / "train" / "quickstart.yaml").write_text("train: {name: mine}\ndata: {synthetic: markov}\n")
    assert load_config(["configs/train/quickstart.yaml"]).train.name == "mine"
    with pytest.raises(ConfigError, match="nope.yaml.*bundled"):
        load_config(["configs/train/nope.yaml"])


def test_wheel_build_ships_configs_inside_the_package(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(REPO / "setup.py", src)
    shutil.copytree(REPO / "kiln", src / "kiln", ignore=shutil.ignore_patterns("__pycache__", "configs"))
    shutil.copytree(REPO / "configs", src / "configs")
    lib = tmp_path / "lib"
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)], cwd=src, check=True,
                   capture_output=True)
    shipped = sorted(p.relative_to(lib / "kiln" / "configs") for p in (lib / "kiln" / "configs").rglob("*.yaml"))
    assert shipped == sorted(p.relative_to(REPO / "configs") for p in (REPO / "configs").rglob("*.yaml"))
    # The built package, imported from elsewhere, finds its own configs (not the repository's).
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(lib)}
    out = subprocess.run([sys.executable, "-c", "from kiln.config import CONFIG_DIR, load_config; "
                          "print(CONFIG_DIR); print(load_config(['configs/train/quickstart.yaml']).train.steps)"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == str(lib / "kiln" / "configs") and out[1] == str(load_config([CONFIG_DIR / "train/quickstart.yaml"]).train.steps)
