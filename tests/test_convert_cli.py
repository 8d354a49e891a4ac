"""`kiln convert` end to end on a checkpoint written by the real training loop: the Hugging Face
export reproduces the trained model's logits in `transformers`, and an imported checkpoint
starts a new run (`checkpoint.init_from`) at the trained model's loss, not at a random one."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kiln.checkpoint.kiln_format import KilnCheckpointReader
from kiln.config import load_config
from kiln.model.llama import Transformer
from kiln.train import train

transformers = pytest.importorskip("transformers")
TINY = ["model.vocab_size=64", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.ffn_dim=128", "model.attention=math", "data.synthetic=markov", "data.seq_len=16",
        "train.micro_batch=8", "train.eval_every=0", "logging.tensorboard=false", "logging.progress=false",
        "logging.log_every=1", "optim.lr=3e-3", "optim.warmup_steps=2"]


def kiln_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True, timeout=300)


def first_loss(run_dir: Path) -> float:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["loss"]


@pytest.mark.timeout(600)
def test_trained_run_to_hf_and_back_into_training(tmp_path):
    cfg = load_config([], [*TINY, f"train.run_dir={tmp_path}", "train.name=base", "train.steps=100",
                           "checkpoint.every=100"])
    train(cfg)
    run = tmp_path / "base"

    proc = kiln_cli("convert", str(run), "--to", "hf", "--out", str(tmp_path / "hf"), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["source_format"] == "kiln" and "config.json" in summary["files"]

    reader = KilnCheckpointReader(run)
    assert reader.step_dir.name == "step_00000100"
    model = Transformer(reader.cfg.model).eval()
    model.load_state_dict({name: reader.get(name) for name in model.state_dict()})
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(tokens) - hf(tokens).logits).abs().max().item()
    print(f"trained run: max abs logit diff kiln vs transformers = {diff:.3g}")
    assert diff <= 1e-5

    proc = kiln_cli("convert", str(tmp_path / "hf"), "--to", "kiln", "--out", str(tmp_path / "imported"))
    assert proc.returncode == 0, proc.stderr
    step_dir = tmp_path / "imported" / "checkpoints" / "step_00000000"
    assert (tmp_path / "imported" / "checkpoints" / "latest").read_text().strip() == step_dir.name
    common = [f"train.run_dir={tmp_path}", "data.synthetic=markov", "train.steps=2", "checkpoint.enabled=false",
              "logging.tensorboard=false", "logging.progress=false", "logging.log_every=1", "train.micro_batch=8",
              "data.seq_len=16"]
    imported_yaml = str(tmp_path / "imported" / "config.yaml")
    train(load_config([imported_yaml], [*common, "train.name=warm", f"checkpoint.init_from={step_dir}"]))
    train(load_config([imported_yaml], [*common, "train.name=cold"]))
    warm, cold, trained = first_loss(tmp_path / "warm"), first_loss(tmp_path / "cold"), first_loss(run)
    print(f"first-step loss: from scratch {cold:.3f}, from the imported checkpoint {warm:.3f}")
    assert abs(cold - trained) < 0.3  # both start from random weights (~ln 64)
    assert warm < cold - 0.5


def test_cli_errors_are_one_line(tmp_path):
    proc = kiln_cli("convert", str(tmp_path / "missing"), "--to", "hf", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "missing" in proc.stderr
    (tmp_path / "junk").mkdir()
    proc = kiln_cli("convert", str(tmp_path / "junk"), "--to", "megatron", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "not a kiln, Hugging Face, Megatron or DeepSpeed checkpoint" in proc.stderr
