"""How long a checkpoint save blocks the training loop: async (DCP async_save) beside synchronous,
for the ~20M-parameter model with its AdamW state, measured in the same run.

    python bench/checkpoint.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kiln.checkpoint.manager import CheckpointManager  # noqa: E402
from kiln.checkpoint.state import ModelState  # noqa: E402
from kiln.config import load_config, to_yaml  # noqa: E402
from kiln.model import Transformer  # noqa: E402
from kiln.optim import build_optimizer  # noqa: E402


def blocking_seconds(model, opt, cfg, async_save: bool, step: int, root: Path) -> tuple[float, float]:
    """(seconds the caller was blocked, seconds until the checkpoint was complete)."""
    mgr = CheckpointManager(root, keep_last=1, async_save=async_save)
    t0 = time.perf_counter()
    mgr.save(step, ModelState([model], [opt]), {"tokens": 0}, None, 0, to_yaml(cfg))
    blocked = time.perf_counter() - t0
    mgr.wait()
    return blocked, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    root = Path(__file__).resolve().parent.parent
    cfg = load_config([root / "configs/model/small.yaml"], ["data.synthetic=markov"])
    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"), distributed=False)
    model(torch.randint(0, 100, (1, 8))).sum().backward()
    opt.step()  # materialise AdamW state so it is part of the checkpoint
    n = sum(p.numel() for p in model.parameters())
    print(f"model small: {n / 1e6:.1f}M params, checkpoint ~{3 * n * 4 / 2**20:.0f} MiB (weights + Adam m, v)")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("sync", "async"):
            runs = [blocking_seconds(model, opt, cfg, mode == "async", i + 1, Path(tmp) / mode)
                    for i in range(args.repeats)]
            results[mode] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
            print(f"{mode:>5}: blocks the loop {results[mode][0] * 1e3:8.1f} ms, complete after "
                  f"{results[mode][1] * 1e3:8.1f} ms (median of {args.repeats})")
    print(f"async blocking time / sync blocking time: {results['async'][0] / results['sync'][0]:.3f}")


if __name__ == "__main__":
    main()
