"""Training-loop oracles: learning a Markov chain to its entropy rate, exact resume, and a
non-finite loss that stops the run without touching the last good checkpoint."""
import json
import shutil

import pytest
import torch

from kiln.checkpoint.manager import find_resumable
from kiln.config import load_config
from kiln.data.synthetic import MarkovSource
from kiln.data.loader import build_loader
from kiln.train import NonFiniteLoss, train

TINY = ["model.vocab_size=64", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=128",
        "data.synthetic=markov", "logging.tensorboard=false", "logging.progress=false"]


def _cfg(tmp_path, *extra):
    return load_config([], [*TINY, f"train.run_dir={tmp_path}", *extra])


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_markov_chain_is_learned_to_its_entropy_rate(tmp_path):
    cfg = _cfg(tmp_path, "data.synthetic_vocab=16", "data.seq_len=32", "train.micro_batch=16",
               "train.steps=300", "train.eval_every=300", "train.eval_steps=8", "optim.lr=3e-3",
               "optim.warmup_steps=20", "checkpoint.enabled=false", "logging.log_every=50")
    train(cfg)
    evals = [r["eval_loss"] for r in _metrics(tmp_path / "default") if "eval_loss" in r]
    # Oracle: the true chain's cross-entropy on exactly the held-out tokens the model was scored on.
    source = MarkovSource(16, seed=cfg.data.seed)
    logp = torch.log(source.transition)
    nll = [-logp[b["input"], b["target"]].mean() for b in build_loader(cfg, "val", 0, 1)]
    oracle = float(torch.stack(nll).mean())
    assert abs(oracle - source.entropy_rate()) < 0.1
    assert evals[-1] - oracle < 0.05, (evals[-1], oracle)
    assert evals[-1] > oracle - 0.02  # cannot beat the generating process


def test_resume_reproduces_uninterrupted_losses_exactly(tmp_path):
    common = ["train.steps=12", "checkpoint.every=6", "checkpoint.keep_last=3", "logging.log_every=1",
              "train.eval_every=0", "data.seq_len=16", "train.micro_batch=4", "train.global_batch_tokens=128"]
    full = _cfg(tmp_path / "a", *common)
    train(full)
    run_a = tmp_path / "a" / "default"
    # An interruption right after the step-6 checkpoint: later checkpoints and metrics never happened.
    run_b = tmp_path / "b" / "default"
    shutil.copytree(run_a, run_b)
    shutil.rmtree(run_b / "checkpoints" / "step_00000012")
    (run_b / "checkpoints" / "latest").write_text("step_00000006\n")
    (run_b / "metrics.jsonl").write_text("")
    summary = train(_cfg(tmp_path / "b", *common))
    assert summary["step"] == 12
    a = {r["step"]: r["loss"] for r in _metrics(run_a)}
    b = {r["step"]: r["loss"] for r in _metrics(run_b)}
    assert sorted(b) == list(range(7, 13))
    assert all(a[s] == b[s] for s in b), [(a[s], b[s]) for s in b]
    assert a[12] < a[1]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    import kiln.parallel

    real_setup = kiln.parallel.setup_parallel

    def poisoned_setup(*args, **kwargs):
        rt = real_setup(*args, **kwargs)
        real_fb, calls = rt.forward_backward, []

        def forward_backward(batch, scale):
            calls.append(1)
            return real_fb(batch, float("nan") if len(calls) == 7 else scale) * (float("nan") if len(calls) == 7 else 1)

        rt.forward_backward = forward_backward
        return rt

    monkeypatch.setattr(kiln.parallel, "setup_parallel", poisoned_setup)
    cfg = _cfg(tmp_path, "train.steps=10", "checkpoint.every=2", "train.eval_every=0", "data.seq_len=16")
    with pytest.raises(NonFiniteLoss, match="step 7.*step_00000006"):
        train(cfg)
    good = find_resumable(tmp_path / "default" / "checkpoints")
    assert good.name == "step_00000006"
    # the surviving checkpoint holds finite weights and training resumes from it
    monkeypatch.setattr(kiln.parallel, "setup_parallel", real_setup)
    summary = train(_cfg(tmp_path, "train.steps=8", "checkpoint.every=2", "train.eval_every=0", "data.seq_len=16"))
    assert summary["step"] == 8
    assert all(r["loss"] == r["loss"] for r in _metrics(tmp_path / "default"))


def test_rerunning_a_finished_run_does_not_rewrite_its_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, "train.steps=4", "checkpoint.every=2", "train.eval_every=0", "data.seq_len=16")
    train(cfg)
    meta = tmp_path / "default" / "checkpoints" / "step_00000004" / "meta.json"
    before = meta.read_text()
    assert train(cfg)["step"] == 4
    assert meta.read_text() == before


def test_resuming_onto_another_data_source_is_a_clear_error(tmp_path):
    from kiln.data.synthetic import MarkovLoader, MarkovSource
    from kiln.errors import KilnError

    loader = MarkovLoader(MarkovSource(8, 0), seq_len=4, micro_batch=1, seed=0, dp_rank=0, dp_size=1, split="train")
    with pytest.raises(KilnError, match="data.synthetic=markov"):
        loader.load_state_dict({"windows": 3, "consumed": [3]})


def test_train_step_reads_the_device_once(monkeypatch, tmp_path):
    """The step keeps losses and the gradient norm on the device: outside the optimizer its one host read
    is the finiteness flag (four micro-batches, clipping active); the interval mean equals the steps'."""
    from kiln.model import Transformer
    from kiln.parallel import setup_parallel
    from kiln.train import train_step

    cfg = _cfg(tmp_path, "data.seq_len=16", "train.micro_batch=2", "optim.grad_clip=1e-3")
    rt = setup_parallel(cfg, Transformer(cfg.model), 1, 0)
    rt.build_optimizers(lambda part: torch.optim.AdamW(part.parameters(), lr=1e-3))
    batches = iter(build_loader(cfg, "train", 0, 1))
    reads, in_optimizer, real_step = [], [], rt.optimizer_step

    def optimizer_step():  # torch's AdamW reads its CPU step counters: the optimizer's business, not the loop's
        in_optimizer.append(True)
        real_step()
        in_optimizer.pop()

    rt.optimizer_step = optimizer_step
    for name in ("__bool__", "__float__", "__int__", "item", "tolist"):
        real = getattr(torch.Tensor, name)

        def read(self, *a, _real=real, _name=name, **k):
            if not in_optimizer:
                reads.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, read)
    results = [train_step(rt, batches, 4, cfg.optim.grad_clip) for _ in range(3)]
    monkeypatch.undo()
    assert reads == ["__bool__"] * 3, reads
    assert all(r.loss.requires_grad is False and r.loss.dim() == 0 for r in results)
    assert all(float(r.grad_norm) > cfg.optim.grad_clip for r in results)  # clipping was active
    window = torch.stack([r.loss for r in results]).mean()
    assert float(rt.reduce_mean(window)) == pytest.approx(sum(float(r.loss) for r in results) / 3)
