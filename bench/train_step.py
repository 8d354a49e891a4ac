"""kiln's training throughput beside a minimal hand-written PyTorch loop, measured in the same run.

Same model (configs/model/small.yaml, ~20M parameters), same batches, same AdamW settings; the
ratio kiln/hand is what matters (target >= 0.95). Both loops see identical pre-generated batches
so that the data source's cost is not part of the comparison.

    python bench/train_step.py [--steps 12] [--seq-len 256] [--micro-batch 8]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kiln.train as loop  # noqa: E402
from kiln.config import load_config  # noqa: E402
from kiln.model import Transformer  # noqa: E402
from kiln.optim import build_optimizer, lr_at, set_lr  # noqa: E402
from kiln.parallel.runtime import cross_entropy  # noqa: E402


class FixedBatches:
    """A loader that cycles through pre-built batches (state: how many were taken)."""

    def __init__(self, batches):
        self.batches, self.taken = batches, 0

    def __iter__(self):
        while True:
            yield self.batches[self.taken % len(self.batches)]
            self.taken += 1

    def state_dict(self):
        return {"taken": self.taken}

    def load_state_dict(self, state):
        self.taken = state["taken"]


def hand_loop(cfg, batches, steps: int) -> float:
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"), distributed=False)
    t0 = None
    for step in range(steps + 1):
        if step == 1:
            t0 = time.perf_counter()  # step 0 is warm-up
        set_lr([opt], lr_at(step, steps, cfg.optim))
        batch = batches[step % len(batches)]
        loss = cross_entropy(model(batch["input"]), batch["target"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * batches[0]["input"].numel() / (time.perf_counter() - t0)


def kiln_loop(cfg, batches, steps: int) -> float:
    loop.build_loader = lambda cfg, split, dp_rank, dp_size: FixedBatches(batches)
    with tempfile.TemporaryDirectory() as tmp:
        cfg.train.run_dir = tmp
        cfg.train.steps = steps + 1
        train = loop.train(cfg)
        records = [json.loads(x) for x in (Path(tmp) / cfg.train.name / "metrics.jsonl").read_text().splitlines()]
    # log_every=1: drop step 1 (warm-up), average the rest by total time
    timed = [r for r in records if r["step"] > 1 and "tokens_per_s" in r]
    seconds = sum(batches[0]["input"].numel() / r["tokens_per_s"] for r in timed)
    return len(timed) * batches[0]["input"].numel() / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=8)
    args = ap.parse_args()
    root = Path(__file__).resolve().parent.parent
    cfg = load_config([root / "configs/model/small.yaml"], [
        "data.synthetic=markov", f"data.seq_len={args.seq_len}", f"train.micro_batch={args.micro_batch}",
        "train.eval_every=0", "checkpoint.enabled=false", "logging.log_every=1", "logging.tensorboard=false",
        "logging.progress=false"])
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        window = torch.randint(0, cfg.model.vocab_size, (args.micro_batch, args.seq_len + 1), generator=g)
        batches.append({"input": window[:, :-1], "target": window[:, 1:]})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model small "
          f"({sum(p.numel() for p in Transformer(cfg.model).parameters()) / 1e6:.1f}M params), "
          f"batch {args.micro_batch}x{args.seq_len}, {args.steps} timed steps")
    hand = hand_loop(cfg, batches, args.steps)
    kiln = kiln_loop(cfg, batches, args.steps)
    hand2 = hand_loop(cfg, batches, args.steps)  # bracket kiln to cancel drift (thermal, page cache)
    ref = (hand + hand2) / 2
    print(f"hand-written loop : {ref:10,.0f} tokens/s  (runs: {hand:,.0f}, {hand2:,.0f})")
    print(f"kiln train loop   : {kiln:10,.0f} tokens/s")
    print(f"ratio kiln/hand   : {kiln / ref:.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
