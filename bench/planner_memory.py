"""The memory formula (kiln/planner/memory.py) against `kiln estimate --measure` on random layouts.

    python bench/planner_memory.py [--n 100] [--seed 0] [--json out.json]
    python bench/planner_memory.py --plot docs/img/memory-breakdown.png   # the docs figure
    python bench/planner_memory.py --wide       # the 21 real-width layouts (layouts.WIDE), ~6 minutes

For each seeded layout (kiln/planner/layouts.py: tp, pp, dp_shard, recompute, seq, micro-batch,
accumulation, DeepSpeed ZeRO-1/2/3) it measures one fake-tensor training step of rank 0 and prints
formula / measured, then the distribution: the share within 10%, the share where the formula is
below the measurement, the layouts where it would say "fits" where the step does not (below it even
with the fit margin), and the worst cases. The reference is measured in the same run, so the ratios hold
on any machine.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kiln.planner.estimate import layout_of  # noqa: E402
from kiln.planner.layouts import random_layouts, wide_layouts  # noqa: E402
from kiln.planner.measure import measure  # noqa: E402
from kiln.planner.memory import fit_margin, memory_breakdown  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write every layout's numbers here")
    ap.add_argument("--plot", help="instead: plot the per-GPU breakdown of an 8B model's layouts on 8 GPUs here")
    ap.add_argument("--wide", action="store_true", help="instead of the seeded layouts: the real-width ones "
                    "(d 1024-5120, pipelines under FSDP, MoE)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    if args.plot:
        return plot(args.plot)
    rows, start = [], time.time()
    for label, cfg, gpus in wide_layouts() if args.wide else random_layouts(args.n, args.seed):
        t = time.time()
        m = measure(cfg, gpus)
        f = memory_breakdown(cfg.model, cfg.data.seq_len, layout_of(cfg, gpus))
        measured, formula = m["total"], f["total"]
        rows.append({"layout": label, "gpus": gpus, "margin": fit_margin(cfg.model), "measured_mib": measured / 2 ** 20,
                     "formula_mib": formula / 2 ** 20, "ratio": formula / measured, "seconds": time.time() - t,
                     "measured": m, "formula": f})
        r = rows[-1]
        print(f"{label:55s} measured {r['measured_mib']:8.1f} MiB  formula {r['formula_mib']:8.1f} MiB  "
              f"ratio {r['ratio']:.3f}  ({r['seconds']:.1f}s)", flush=True)
    ratios = sorted(r["ratio"] for r in rows)
    n = len(ratios)
    within = sum(abs(x - 1) <= 0.10 for x in ratios)
    under = sum(x < 1 for x in ratios)
    wrong = sum(r["ratio"] * r["margin"] < 1 for r in rows)
    print(f"\n{n} layouts in {time.time() - start:.0f}s: within 10%: {within}/{n} ({within / n:.0%}); "
          f"formula below measured: {under}/{n}; below it with the fit margin (1.05, MoE 1.10: it would "
          f"say fits where the step does not): {wrong}/{n}")
    groups: dict[str, list[float]] = {}
    for r in rows:
        label = r["layout"]
        kind = ("DeepSpeed" if label.startswith("ds-") else "MoE" if " moe" in label
                else "TP" if " tp1 " not in f" {label} " else "PP" if " pp2 " in label else "FSDP2 only")
        groups.setdefault(kind, []).append(r["ratio"])
    for kind, xs in groups.items():
        print(f"  {kind:<11} {len(xs):3d} layouts: within 10% {sum(abs(x - 1) <= 0.1 for x in xs) / len(xs):.0%}, "
              f"below 1: {sum(x < 1 for x in xs)}, min {min(xs):.3f}, max {max(xs):.3f}")
    print(f"ratio formula/measured: min {ratios[0]:.3f}  p10 {ratios[n // 10]:.3f}  median {ratios[n // 2]:.3f}  "
          f"p90 {ratios[(9 * n) // 10]:.3f}  max {ratios[-1]:.3f}")
    for r in sorted(rows, key=lambda r: abs(r["ratio"] - 1), reverse=True)[:5]:
        print(f"  worst: {r['layout']}: {r['ratio']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


# An 8B model's widths (configs/model/8b.yaml) with 8 of its 32 layers (a fake-tensor step costs CPU
# time per layer, not per width), 4096-token sequences, on 8 GPUs: the layouts docs/planning.md shows.
PLOT_LAYERS = 8
PLOT_LAYOUTS = [
    ("FSDP8, no recompute", ["parallel.dp_shard=8", "parallel.activation_checkpoint=none"]),
    ("FSDP8, selective", ["parallel.dp_shard=8", "parallel.activation_checkpoint=selective"]),
    ("FSDP8, full", ["parallel.dp_shard=8", "parallel.activation_checkpoint=full"]),
    ("TP2 x FSDP4, selective", ["parallel.tp=2", "parallel.dp_shard=4", "parallel.activation_checkpoint=selective"]),
    ("TP4 x FSDP2, none", ["parallel.tp=4", "parallel.dp_shard=2", "parallel.activation_checkpoint=none"]),
    ("PP2 x FSDP4, full", ["parallel.pp=2", "parallel.dp_shard=4", "parallel.activation_checkpoint=full",
                           "train.micro_batch=2"]),
    ("DeepSpeed ZeRO-1 x8, full", ["parallel.engine=deepspeed", "parallel.zero_stage=1", "parallel.dp_shard=8",
                                   "parallel.activation_checkpoint=full"]),
    ("DeepSpeed ZeRO-3 x8, full", ["parallel.engine=deepspeed", "parallel.zero_stage=3", "parallel.dp_shard=8",
                                   "parallel.activation_checkpoint=full"]),
]


def plot(path: str) -> int:
    from kiln.config import load_config
    from kiln.planner.plot import plot_memory_layouts

    root = Path(__file__).resolve().parent.parent
    rows = []
    for label, over in PLOT_LAYOUTS:
        cfg = load_config([root / "configs/model/8b.yaml"], ["data.synthetic=markov", "data.seq_len=4096",
                                                             f"model.n_layers={PLOT_LAYERS}", "train.micro_batch=1",
                                                             *over])
        formula = memory_breakdown(cfg.model, cfg.data.seq_len, layout_of(cfg, 8))
        measured = measure(cfg, 8)["total"]
        rows.append({"label": label, "formula": formula, "measured": measured})
        print(f"{label:28s} formula {formula['total'] / 2 ** 30:6.1f} GiB  measured {measured / 2 ** 30:6.1f} GiB",
              flush=True)
    plot_memory_layouts(rows, path, f"Per-GPU memory, 8B widths x {PLOT_LAYERS} layers, seq 4096, micro-batch 1, "
                                    "8 GPUs")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
