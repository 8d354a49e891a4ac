"""bench/gpu_check.sh --cpu: every part of the GPU check runs end to end on CPU with tiny shapes, so the
script is known to work before a GPU's scarce minutes are spent on it."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(600)
def test_cpu_smoke_runs_every_part(tmp_path):
    gpu_check = load_gpu_check()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["part"] for r in rows] == [p.name for p in gpu_check.PARTS], "every part, once, in order"
    for r in rows:
        if "flash" in r["part"] and r["part"] != "attention":
            assert r["status"] == "skipped" and "CUDA" in r["detail"], r  # the only parts that must skip on CPU
        else:
            assert r["status"] == "ok", r
        if r["part"].startswith("tput-") and r["status"] == "ok":
            assert r["tokens_per_s"] > 0 and r["fused_adamw"] is True and r["attention"] == "sdpa"
            assert r["compile"] is ("-compile" in r["part"])
            assert r["activation_checkpoint"] == ("selective" if r["part"].endswith("-ac") else "none")
    table = (tmp_path / "table.md").read_text()
    for r in rows:
        assert f"| {r['part']} | {r['status']} |" in table


def test_parts_that_do_not_fit_the_budget_are_skipped_not_started(tmp_path, capsys):
    gpu_check = load_gpu_check()
    code = gpu_check.main(["--cpu", "--out", str(tmp_path), "--budget", "2", "--only", "attention", "fsdp2"])
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert code == 0 and [r["status"] for r in rows] == ["skipped", "skipped"]
    assert all("out of budget" in r["detail"] and r["seconds"] < 1 for r in rows)


def test_unknown_part_is_one_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu", "--only", "tput-sdpa",
                           "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown part 'tput-sdpa'" in proc.stderr


def test_a_part_past_its_timeout_is_killed_and_recorded(tmp_path):
    """The budget holds: the part's process group is killed at the timeout and the row says so."""
    gpu_check = load_gpu_check()
    code = gpu_check.main(["--cpu", "--isolate", "--out", str(tmp_path), "--budget", "3", "--reserve", "1",
                           "--only", "deepspeed"])
    (row,) = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert code == 1 and row["status"] == "timeout" and row["seconds"] < 4, row
    assert "| deepspeed | timeout |" in (tmp_path / "table.md").read_text()
