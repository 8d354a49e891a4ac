"""Gradient noise scale (McCandlish et al. 2018): the two-batch estimator against the definition
B_simple = tr(Sigma) / |G|^2 on synthetic per-example gradients, and logged by the training loop."""
import json

import numpy as np
import pytest

from kiln.config import load_config
from kiln.errors import KilnError
from kiln.noise_scale import NoiseScale, estimate


def test_two_batch_estimator_recovers_the_defined_noise_scale():
    rng = np.random.default_rng(0)
    dim, b_small, b_big = 50, 4, 64
    true_g = rng.normal(0, 0.3, dim)
    scales = rng.uniform(0.5, 2.0, dim)  # per-example gradient = G + noise with diagonal covariance
    b_simple = float(np.sum(scales ** 2) / (true_g @ true_g))  # the definition: tr(Sigma) / |G|^2
    g2s, ss = [], []
    for _ in range(4000):
        per_example = true_g + rng.normal(0, 1, (b_big, dim)) * scales
        small, big = per_example[:b_small].mean(0), per_example.mean(0)
        g2, s = estimate(small @ small, big @ big, b_small, b_big)
        g2s.append(g2)
        ss.append(s)
    assert np.mean(g2s) == pytest.approx(true_g @ true_g, rel=0.05)
    assert np.mean(ss) == pytest.approx(np.sum(scales ** 2), rel=0.05)
    assert np.mean(ss) / np.mean(g2s) == pytest.approx(b_simple, rel=0.07)


def test_noise_scale_refuses_what_it_cannot_measure():
    with pytest.raises(KilnError, match="at least 2 micro-batches"):
        NoiseScale(1, 128, 128)
    with pytest.raises(KilnError, match="engine=native"):
        NoiseScale(4, 128, 512, engine="deepspeed")


def test_training_loop_logs_the_noise_scale(tmp_path):
    from kiln.train import train

    cfg = load_config([], ["model.vocab_size=64", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
                           "model.ffn_dim=128", "data.synthetic=markov", "logging.tensorboard=false",
                           "logging.progress=false", f"train.run_dir={tmp_path}", "train.steps=6",
                           "train.eval_every=0", "data.seq_len=16", "train.micro_batch=2",
                           "train.global_batch_tokens=128", "checkpoint.enabled=false", "logging.log_every=1",
                           "train.noise_scale=true"])
    train(cfg)
    records = [json.loads(x) for x in (tmp_path / "default" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert len(train_records) == 6
    for r in train_records:
        assert np.isfinite(r["noise_g2"]) and np.isfinite(r["noise_trace"]) and "noise_scale_tokens" in r
