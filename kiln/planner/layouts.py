"""Seeded random layouts for checking the memory formula against `kiln estimate --measure`.

Shared by tests/test_planner_measure.py (a held-out subset) and bench/planner_memory.py (100 layouts
per seed; the goal: the formula within 10% of the measured peak for >= 90% of them, and never
"fits" where the measured step does not).
Widths are small but realistic in shape (d 512-768, GQA or MHA, vocab 32k) so one fake-tensor step
takes seconds on one CPU core.
"""
from __future__ import annotations

import random

from kiln.config import Config, load_config
from kiln.errors import ConfigError


def random_layouts(n: int, seed: int = 0) -> list[tuple[str, Config, int]]:
    """`n` valid (label, config, gpus) triples: native FSDP2 with tp/pp/dp_shard, selective or full
    recompute, accumulation, a quarter of them MoE (experts, top-k, shared experts, every n-th layer,
    dropless or capacity 1.25), and DeepSpeed ZeRO-1/2/3."""
    rng = random.Random(seed)
    moe_rng = random.Random(f"moe-{seed}")  # its own stream: the other layouts stay those of before MoE
    out: list[tuple[str, Config, int]] = []
    while len(out) < n:
        d, heads, kv = rng.choice([(512, 8, 8), (512, 8, 2), (768, 12, 4)])
        layers = rng.choice([2, 4])
        seq = rng.choice([256, 512, 1024])
        deepspeed = rng.random() < 0.2
        tp = 1 if deepspeed else rng.choice([1, 1, 2, 4])
        pp = 1 if deepspeed else rng.choice([1, 1, 2])
        shard = rng.choice([1, 2, 4])
        ac = rng.choice(["none", "selective", "full"])
        micro = rng.choice([1, 2, 4]) * (pp if pp > 1 else 1)
        accum = rng.choice([1, 1, 2])
        over = ["data.synthetic=markov", f"model.d_model={d}", f"model.n_heads={heads}", f"model.n_kv_heads={kv}",
                f"model.n_layers={layers}", "model.vocab_size=32000", f"data.seq_len={seq}",
                f"model.max_seq_len={max(seq, 1024)}", f"parallel.tp={tp}", f"parallel.pp={pp}",
                f"parallel.dp_shard={shard}", f"parallel.activation_checkpoint={ac}", f"train.micro_batch={micro}",
                f"train.global_batch_tokens={micro * seq * shard * accum}"]
        label = f"tp{tp} pp{pp} dp{shard} {ac} s{seq} b{micro} acc{accum} d{d}/{kv}kv L{layers}"
        if moe_rng.random() < 0.25 and not deepspeed:  # MoE: every layer, or every second
            experts, top_k = moe_rng.choice([(4, 1), (4, 2), (8, 2)])
            shared, every = moe_rng.choice([0, 0, 1]), moe_rng.choice([1, 2])
            capacity = moe_rng.choice([None, None, 1.25])
            over += [f"model.moe.n_experts={experts}", f"model.moe.top_k={top_k}",
                     f"model.moe.shared_experts={shared}", f"model.moe.every_n_layers={every}"]
            if capacity is not None:
                over.append(f"model.moe.capacity_factor={capacity}")
            label += f" moe{experts}x{top_k}" + (f"+{shared}" if shared else "") + (f"/{every}" if every > 1 else "") + \
                (f" cf{capacity}" if capacity else "")
        if deepspeed:
            zero = rng.choice([1, 2, 3])
            over += ["parallel.engine=deepspeed", f"parallel.zero_stage={zero}"]
            label = f"ds-zero{zero} " + label
        try:
            cfg = load_config([], over)
        except ConfigError:
            continue
        out.append((label, cfg, tp * pp * shard))
    return out
