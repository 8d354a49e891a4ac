"""DeepSpeed engine checkpoints convert with the same verb. Oracle: the engine's own gathered
parameters at save time, written by the saving process beside the checkpoint."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kiln.convert.convert import convert, detect_format
from kiln.checkpoint.kiln_format import KilnCheckpointReader
from kiln.errors import KilnError

pytest.importorskip("deepspeed")

SAVE = r'''
import contextlib, os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed, torch.distributed as dist
from kiln.config import Config, ModelConfig, to_yaml
from kiln.model.llama import Transformer
out, stage = sys.argv[1], int(sys.argv[3])
deepspeed.init_distributed("gloo")
cfg = Config(model=ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=stage == 3))
cfg.data.synthetic = "markov"
torch.manual_seed(0)
model = Transformer(cfg.model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={"train_micro_batch_size_per_gpu": 2,
                                  "zero_optimization": {"stage": stage}})
tok = torch.randint(0, 64, (2, 9))
loss = torch.nn.functional.cross_entropy(engine(tok[:, :-1]).flatten(0, 1), tok[:, 1:].flatten())
engine.backward(loss)
engine.step()
engine.save_checkpoint(os.path.join(out, "checkpoints"), tag="step_00000001")
open(os.path.join(out, "config.yaml"), "w").write(to_yaml(cfg))
gather = deepspeed.zero.GatheredParameters(list(model.parameters())) if stage == 3 else contextlib.nullcontext()
with gather:
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, os.path.join(out, "expected.pt"))
dist.barrier(); dist.destroy_process_group(); sys.stdout.flush(); sys.stderr.flush(); os._exit(0)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_deepspeed_run(tmp: Path, stage: int) -> Path:
    script, run = tmp / "save.py", tmp / f"ds_zero{stage}"
    script.write_text(SAVE)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), str(run), str(_free_port()), str(stage)],
                          capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_checkpoint_converts(tmp_path, stage):
    run = save_deepspeed_run(tmp_path, stage)
    assert detect_format(run) == "deepspeed"
    expected = torch.load(run / "expected.pt", weights_only=True)
    convert(run, "kiln", tmp_path / "kiln")
    reader = KilnCheckpointReader(tmp_path / "kiln")
    assert reader.cfg.model.tie_embeddings == (stage == 3)
    for name, t in expected.items():
        assert torch.equal(reader.get(name), t), name
    convert(run / "checkpoints" / "step_00000001", "hf", tmp_path / "hf")  # a tag dir works as SRC too
    assert (tmp_path / "hf" / "model.safetensors").is_file()


@pytest.mark.timeout(600)
def test_deepspeed_file_with_foreign_pickle_is_refused(tmp_path):
    run = save_deepspeed_run(tmp_path, 2)
    path = run / "checkpoints" / "step_00000001" / "mp_rank_00_model_states.pt"
    blob = torch.load(path, weights_only=False)
    blob["hook"] = os.system  # would run on a plain torch.load
    torch.save(blob, path)
    with pytest.raises(KilnError, match="refusing"):
        convert(run, "kiln", tmp_path / "kiln")
