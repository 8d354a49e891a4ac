"""Batch-size ramp-up (kiln/batch_ramp.py): the schedule against a step-by-step oracle, its config
errors, and a ramped training run whose logged tokens follow it and whose resume across the ramp's
end takes exactly the uninterrupted run's batches."""
import json
import shutil

import pytest

from kiln.batch_ramp import BatchRamp, batch_ramp
from kiln.config import load_config
from kiln.errors import ConfigError
from kiln.train import train

TINY = ["model.vocab_size=64", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=128",
        "data.synthetic=markov", "logging.tensorboard=false", "logging.progress=false"]
# 4 x 16 = 64 tokens per micro-step on one rank; full batch 4 micro-steps; ramp from 1 over 512 tokens
RAMP = ["data.seq_len=16", "train.micro_batch=4", "train.global_batch_tokens=256", "train.batch_ramp_start_tokens=64",
        "train.batch_ramp_tokens=512"]


def _oracle(start, full, ramp_tokens, micro, steps):
    """Linear growth in consumed tokens, rounded down to whole micro-steps, written out by hand."""
    out, seen = [], 0
    for _ in range(steps):
        frac = min(1.0, seen / ramp_tokens)
        k = max(start, min(full, int(start + (full - start) * frac + 1e-9)))
        out.append(k)
        seen += k * micro
    return out


@pytest.mark.parametrize("start,full,ramp_tokens,micro", [(1, 4, 512, 64), (1, 8, 10_000, 100), (3, 5, 1, 7),
                                                          (2, 64, 2 ** 20, 4096), (1, 2, 64, 64)])
def test_schedule_matches_the_linear_ramp_and_its_token_count(start, full, ramp_tokens, micro):
    r = BatchRamp(micro, start, full, ramp_tokens)
    steps = 400
    expect = _oracle(start, full, ramp_tokens, micro, steps)
    got, seen = [], 0
    for n in range(steps):
        assert r.tokens_after(n) == seen
        got.append(r.accum_at(seen))
        seen += got[-1] * micro
    assert got == expect
    assert got[0] == start and got == sorted(got)  # starts at start, never shrinks
    assert r.accum_at(ramp_tokens) == full and r.accum_at(10 * ramp_tokens) == full


def test_the_small_case_by_hand():
    r = BatchRamp(64, 1, 4, 512)
    # tokens before each step: 0 64 128 192 320 448 640 ... -> 1 1 1 2 2 3 4 4
    assert [r.accum_at(r.tokens_after(n)) for n in range(8)] == [1, 1, 1, 2, 2, 3, 4, 4]
    assert r.tokens_after(8) == 64 * (1 + 1 + 1 + 2 + 2 + 3 + 4 + 4)


@pytest.mark.parametrize("extra,key", [
    (["train.global_batch_tokens=null"], "train.batch_ramp_start_tokens"),
    (["train.batch_ramp_tokens=null"], "train.batch_ramp_tokens"),
    (["train.batch_ramp_start_tokens=100"], "train.batch_ramp_start_tokens"),  # not whole micro-steps
    (["train.batch_ramp_start_tokens=256"], "train.batch_ramp_start_tokens"),  # not below the full batch
    (["train.noise_scale=true"], "train.batch_ramp_start_tokens"),
    (["parallel.engine=deepspeed"], "train.batch_ramp_start_tokens"),
])
def test_bad_ramps_name_their_key(extra, key):
    cfg = load_config([], [*TINY, *RAMP, *extra])
    with pytest.raises(ConfigError, match=f"config error: {key}:"):
        batch_ramp(cfg, 1)


@pytest.mark.parametrize("override", ["train.batch_ramp_start_tokens=0", "train.batch_ramp_tokens=-5"])
def test_ramp_fields_declare_their_ranges(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config([], [*TINY, *RAMP, override])


def _metrics(run_dir):
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def test_ramped_run_logs_the_schedules_tokens_and_resumes_across_the_ramp_end(tmp_path):
    common = [*TINY, *RAMP, "train.steps=9", "checkpoint.every=4", "checkpoint.keep_last=3", "logging.log_every=1",
              "train.eval_every=0"]
    cfg = load_config([], [*common, f"train.run_dir={tmp_path / 'a'}"])
    train(cfg)
    run_a = tmp_path / "a" / "default"
    a = _metrics(run_a)
    ramp = batch_ramp(cfg, 1)
    assert [a[s]["tokens"] for s in sorted(a)] == [ramp.tokens_after(s) for s in range(1, 10)]
    assert a[9]["tokens"] == 64 * (1 + 1 + 1 + 2 + 2 + 3 + 4 + 4 + 4)  # not 9 full steps of 256
    # Interrupted right after the step-4 checkpoint (mid-ramp); the resume crosses the ramp's end.
    run_b = tmp_path / "b" / "default"
    shutil.copytree(run_a, run_b)
    for later in ("step_00000008", "step_00000009"):
        shutil.rmtree(run_b / "checkpoints" / later)
    (run_b / "checkpoints" / "latest").write_text("step_00000004\n")
    (run_b / "metrics.jsonl").write_text("")
    train(load_config([], [*common, f"train.run_dir={tmp_path / 'b'}"]))
    b = _metrics(run_b)
    assert sorted(b) == list(range(5, 10))
    assert all(a[s]["loss"] == b[s]["loss"] and a[s]["tokens"] == b[s]["tokens"] for s in b), (a, b)
    # A changed ramp is a different run: refused on resume, naming what differs.
    with pytest.raises(Exception, match="batch ramp"):
        train(load_config([], [*common, f"train.run_dir={tmp_path / 'b'}", "train.batch_ramp_tokens=1024",
                               "train.steps=12"]))
