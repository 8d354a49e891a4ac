"""Model FLOPs utilisation of kiln's training loop on one device, per attention kernel.

    python bench/mfu.py [--model configs/model/1b.yaml] [--seq-len 2048] [--micro-batch 4] [--steps 20]

On a GPU it runs bf16 with `sdpa` and, where flash-attn is installed, `flash`, and prints tokens/s
and MFU (PaLM formula, dense bf16 peak from kiln/planner/hardware.py) for each, plus flash/sdpa.
On a CPU the peak is unknown, so MFU prints as n/a (try a small model: --model configs/model/tiny.yaml).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import kiln.train as loop  # noqa: E402
from kiln.config import load_config  # noqa: E402
from kiln.model.attention import flash_attn_module  # noqa: E402
from train_step import FixedBatches  # noqa: E402


def measure(model_cfg: Path, attention: str, seq_len: int, micro_batch: int, steps: int) -> dict:
    cfg = load_config([model_cfg], [
        "data.synthetic=markov", f"data.seq_len={seq_len}", f"train.micro_batch={micro_batch}",
        f"train.steps={steps}", f"model.attention={attention}", "train.eval_every=0", "checkpoint.enabled=false",
        "logging.log_every=1", "logging.tensorboard=false", "logging.progress=false",
        f"model.max_seq_len={max(seq_len, 16)}"])
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        w = torch.randint(0, cfg.model.vocab_size, (micro_batch, seq_len + 1), generator=g)
        batches.append({"input": w[:, :-1], "target": w[:, 1:]})
    loop.build_loader = lambda cfg, split, dp_rank, dp_size: FixedBatches(batches)
    with tempfile.TemporaryDirectory() as tmp:
        cfg.train.run_dir = tmp
        loop.train(cfg)
        rows = [json.loads(x) for x in (Path(tmp) / cfg.train.name / "metrics.jsonl").read_text().splitlines()]
    timed = rows[len(rows) // 4:]  # drop warm-up (allocator, kernel selection)
    tps = sum(r["tokens_per_s"] for r in timed) / len(timed)
    mfus = [r["mfu"] for r in timed if r["mfu"] is not None]
    return {"attention": attention, "tokens_per_s": tps, "mfu": sum(mfus) / len(mfus) if mfus else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = Path(__file__).resolve().parent.parent
    ap.add_argument("--model", type=Path, default=root / "configs/model/1b.yaml")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    kernels = ["sdpa"] + (["flash"] if torch.cuda.is_available() and flash_attn_module() else [])
    print(f"device {device}; model {args.model.name}; batch {args.micro_batch}x{args.seq_len}; kernels {kernels}")
    results = [measure(args.model, k, args.seq_len, args.micro_batch, args.steps) for k in kernels]
    for r in results:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"{r['attention']:>6}: {r['tokens_per_s']:12,.0f} tokens/s   MFU {mfu}")
    if len(results) == 2:
        print(f"flash/sdpa tokens/s ratio: {results[1]['tokens_per_s'] / results[0]['tokens_per_s']:.3f}")


if __name__ == "__main__":
    main()
