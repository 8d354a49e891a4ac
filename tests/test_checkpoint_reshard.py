"""Resharding on resume: a checkpoint saved under one parallel layout resumes under another with
the same next-step losses as the uninterrupted run (fp32, real gloo processes), and a changed DP size
keeps the data position (the global batch stream continues with nothing lost or repeated)."""
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import run_group

COMMON = ["model.vocab_size=64", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=128",
          "data.synthetic=markov", "data.seq_len=16", "train.micro_batch=2", "train.global_batch_tokens=128",
          "train.steps=4", "checkpoint.every=2", "checkpoint.keep_last=5", "train.eval_every=0",
          "logging.log_every=1", "logging.tensorboard=false", "logging.progress=false"]
LAYOUTS = {
    "single": (1, []),
    "tp2": (2, ["parallel.tp=2", "parallel.dp_shard=1"]),
    "fsdp2": (2, ["parallel.dp_shard=2"]),
    "pp2": (2, ["parallel.pp=2", "parallel.dp_shard=1", "parallel.pp_schedule=1f1b"]),
    "dp4": (4, ["parallel.dp_shard=4"]),
    "zero2": (2, ["parallel.engine=deepspeed", "parallel.zero_stage=2", "parallel.dp_shard=2"]),
    # MoE: experts split over ep=2 (all-to-all) -> experts FSDP-sharded like the rest
    "ep2_moe": (2, ["model.moe.n_experts=4", "parallel.ep=2", "parallel.dp_shard=2"]),
    "fsdp2_moe": (2, ["model.moe.n_experts=4", "parallel.dp_shard=2"]),
}


def _train(layout: str, run_root: Path, data: tuple = ()) -> dict:
    nproc, extra = LAYOUTS[layout]
    overrides = [*COMMON, *data, *extra, f"train.run_dir={run_root}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    verb = ["train"] if nproc == 1 else ["launch", "--nproc", str(nproc)]
    proc = run_group([sys.executable, "-m", "kiln.cli", *verb, *overrides], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = (run_root / "default" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def _interrupt_after(src: Path, dst: Path, step: int) -> None:
    """dst is src as if the job had died right after the checkpoint at `step`."""
    shutil.copytree(src / "default", dst / "default")
    ckpts = dst / "default" / "checkpoints"
    for p in ckpts.glob("step_*"):
        if int(p.name.split("_")[1]) > step:
            shutil.rmtree(p)
    (ckpts / "latest").write_text(f"step_{step:08d}\n")
    (dst / "default" / "metrics.jsonl").write_text("")


@pytest.mark.parametrize("saved,resumed", [("tp2", "fsdp2"), ("pp2", "single"), ("fsdp2", "dp4"),
                                           ("ep2_moe", "fsdp2_moe")])
def test_resume_under_another_layout_continues_exactly(tmp_path, saved, resumed):
    full = _train(saved, tmp_path / "full")
    _interrupt_after(tmp_path / "full", tmp_path / "resumed", 2)
    cont = _train(resumed, tmp_path / "resumed")
    assert sorted(cont) == [3, 4]
    for row in (*full.values(), *cont.values()) if "moe" in saved else ():  # averaged over replicas once
        assert sum(row["moe_load"]) == pytest.approx(1.0, abs=1e-4) and row["moe_aux_loss"] > 0
    for step in (3, 4):
        assert cont[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-5), (step, cont[step], full[step])
        assert cont[step]["tokens"] == full[step]["tokens"]
    meta = json.loads((tmp_path / "resumed" / "default" / "checkpoints" / "step_00000004" / "meta.json").read_text())
    # every new DP rank's loader continued from the same global position: 4 steps x 4 micro-batches
    nranks = {"fsdp2": 2, "dp4": 4, "single": 1, "fsdp2_moe": 2}[resumed]
    assert {int(s["batches_yielded"]) * nranks for s in meta["data_state"].values()} == {16}


def test_deepspeed_checkpoint_resumes_exactly_and_converts(tmp_path):
    full = _train("zero2", tmp_path / "full")
    step_dir = tmp_path / "full" / "default" / "checkpoints" / "step_00000004"
    assert json.loads((step_dir / "meta.json").read_text())["engine"] == "deepspeed"
    _interrupt_after(tmp_path / "full", tmp_path / "resumed", 2)
    cont = _train("zero2", tmp_path / "resumed")
    for step in (3, 4):
        assert cont[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-6)
    # the native engine refuses it with a pointer to `kiln convert`, which imports it
    proc = run_group([sys.executable, "-m", "kiln.cli", "train", *COMMON, "train.steps=6",
                           f"train.run_dir={tmp_path / 'full'}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "kiln convert" in proc.stderr
    out = tmp_path / "imported"
    proc = run_group([sys.executable, "-m", "kiln.cli", "convert", str(tmp_path / "full" / "default"),
                           "--to", "kiln", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # and a new DeepSpeed run starts from the imported weights (loaded before ZeRO copies its fp32 master)
    tuned = _train("zero2", tmp_path / "tuned", (f"checkpoint.init_from={out}", "optim.lr=1e-9", "optim.warmup_steps=0"))
    assert tuned[1]["loss"] < full[1]["loss"] - 0.05  # far from the random-init loss
    assert tuned[4]["loss"] == pytest.approx(tuned[1]["loss"], abs=0.1)  # and ZeRO's steps keep them


def test_a_val_shard_only_one_rank_finds_corrupt_skips_eval_on_every_rank(tmp_path):
    """Shard hashing is split over ranks; if the hashing rank cannot build the val loader, all ranks skip
    evaluation together instead of the others waiting forever in its collectives."""
    import random

    from kiln.data.prepare import prepare

    rng = random.Random(0)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": "".join(rng.choice("abcdefgh \n") for _ in range(200))}) + "\n"
                              for _ in range(40)))
    prepare([str(corpus)], str(tmp_path / "data"), "byte", samples_per_shard=6, val_fraction=0.3, sample_tokens=64,
            num_proc=1)
    val = sorted((tmp_path / "data").glob("val-*.tar"))
    raw = bytearray(val[0].read_bytes())
    raw[-1100] ^= 0xFF  # a flipped token byte: structure intact, only the sha256 (one rank's job) catches it
    val[0].write_bytes(bytes(raw))
    data = ["model.vocab_size=257", "data.synthetic=null", f"data.path={tmp_path / 'data'}", "data.num_workers=0",
            "train.eval_every=2", "train.eval_steps=1"]
    metrics = _train("fsdp2", tmp_path / "run", data)
    assert sorted(metrics) == [1, 2, 3, 4]  # trained to the end, no hang
    assert not any("eval_loss" in r for r in metrics.values())  # both ranks skipped evaluation


def test_dp2_to_dp4_on_prepared_shards_continues_the_global_batch_stream(tmp_path):
    """The shard loader's global stream: DP=2 (2 micro-batches per step) -> DP=4 (1 per step) gives the
    uninterrupted run's next-step losses, so every step sees the same windows."""
    import random

    from kiln.data.prepare import prepare

    rng = random.Random(0)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": "".join(rng.choice("abcdefgh \n") for _ in range(rng.randint(20, 300)))})
                              + "\n" for _ in range(40)))
    prepare([str(corpus)], str(tmp_path / "data"), "byte", samples_per_shard=6, val_fraction=0, sample_tokens=64,
            num_proc=1)
    data = ["model.vocab_size=257", "data.synthetic=null", f"data.path={tmp_path / 'data'}", "data.num_workers=1", "data.shuffle_buffer=4",
            "data.document_mask=true"]
    full = _train("fsdp2", tmp_path / "full", data)
    _interrupt_after(tmp_path / "full", tmp_path / "resumed", 2)
    cont = _train("dp4", tmp_path / "resumed", data)
    assert sorted(cont) == [3, 4]
    for step in (3, 4):
        assert cont[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-5), (step, cont[step], full[step])
    meta = json.loads((tmp_path / "resumed" / "default" / "checkpoints" / "step_00000004" / "meta.json").read_text())
    states = meta["data_state"].values()
    assert sorted(meta["data_state"]) == ["0", "1", "2", "3"]
    assert {(s["windows"], s["dp_size"]) for s in states} == {(4 * 8, 4)}  # 4 steps x 128 tokens / 16 per window
