"""Seeded random layouts for checking the memory formula against `kiln estimate --measure`.

Shared by tests/test_planner_measure.py (a held-out subset) and bench/planner_memory.py (100 layouts
per seed; the goal: the formula within 10% of the measured peak for >= 90% of them, and never
"fits" where the measured step does not).
Widths are small but realistic in shape (d 512-768, GQA or MHA, vocab 32k) so one fake-tensor step
takes seconds on one CPU core; WIDE adds layouts at real widths, where other peaks win.
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


# Layouts at real widths (d 1024-5120, vocab 32k-128k; 3-28 GiB per GPU measured), where per-layer
# and per-parameter peaks outweigh the logits that dominate the small seeded layouts above: FSDP,
# TP and pipelines, MoE models with 8-32 experts. Columns: d_model, heads, kv heads, layers, vocab,
# seq, tp, pp, dp_shard, recompute, micro-batch (sequences per step), accumulation, MoE (experts,
# top_k, shared, every) or None, and optionally more overrides.
WIDE = [
    (2048, 16, 4, 12, 32000, 2048, 1, 1, 8, "none", 1, 1, (8, 2, 0, 1)),
    (2048, 16, 4, 12, 32000, 2048, 1, 1, 8, "selective", 1, 1, (8, 2, 0, 1)),
    (2048, 16, 4, 12, 32000, 2048, 2, 1, 4, "none", 1, 1, (8, 2, 0, 1)),
    (2048, 16, 4, 12, 32000, 2048, 2, 1, 4, "selective", 1, 1, (8, 1, 1, 1)),
    (2048, 16, 4, 12, 32000, 2048, 1, 1, 8, "full", 1, 1, (8, 2, 0, 1)),
    (2048, 16, 4, 12, 32000, 2048, 4, 1, 2, "none", 1, 1, (8, 2, 1, 1)),
    (1536, 12, 4, 16, 64000, 4096, 1, 1, 8, "none", 1, 1, (16, 2, 0, 2)),
    (1536, 12, 4, 16, 64000, 4096, 2, 1, 4, "selective", 1, 2, (16, 2, 0, 2)),
    (1536, 12, 4, 16, 64000, 2048, 1, 1, 8, "full", 2, 1, (16, 1, 1, 1)),
    (1536, 12, 4, 16, 64000, 2048, 1, 2, 4, "none", 2, 1, (8, 2, 0, 1)),
    (2048, 16, 4, 8, 64000, 8192, 4, 1, 2, "none", 1, 1, (8, 2, 1, 2)),
    (1024, 8, 4, 12, 64000, 1024, 1, 1, 8, "selective", 4, 2, (32, 4, 1, 1)),
    (2048, 16, 8, 16, 128256, 2048, 1, 2, 4, "none", 4, 1, None),
    (4096, 32, 8, 8, 128256, 1024, 1, 2, 4, "selective", 2, 1, None),
    (4096, 32, 8, 8, 128256, 2048, 2, 2, 2, "full", 4, 2, None),
    (3072, 24, 8, 12, 128256, 4096, 1, 2, 4, "full", 2, 1, None),
    (4096, 32, 8, 8, 128256, 512, 1, 2, 4, "none", 4, 1, None),
    (2048, 16, 8, 24, 128256, 1024, 1, 2, 2, "selective", 2, 2, None),
    (5120, 40, 8, 8, 128256, 1024, 2, 2, 4, "full", 2, 1, None),
    (2048, 16, 8, 12, 128256, 1024, 1, 2, 4, "selective", 4, 1, (16, 2, 0, 2)),
    (1536, 12, 4, 16, 128256, 2048, 2, 2, 2, "none", 2, 2, (8, 1, 1, 1)),
    # more pipeline micro-batches than stages (1F1B's steady state), and GPipe
    (1536, 12, 4, 8, 64000, 2048, 1, 2, 2, "none", 6, 1, None, ("parallel.pp_microbatches=6",)),
    (1536, 12, 4, 8, 64000, 2048, 1, 2, 2, "none", 16, 1, None, ("parallel.pp_microbatches=16",)),
    (1536, 12, 4, 8, 64000, 2048, 1, 2, 4, "selective", 8, 1, None, ("parallel.pp_microbatches=8",)),
    (1536, 12, 4, 8, 64000, 2048, 1, 2, 2, "none", 4, 1, None,
     ("parallel.pp_microbatches=4", "parallel.pp_schedule=gpipe")),
]


def wide_layouts() -> list[tuple[str, Config, int]]:
    """The (label, config, gpus) of every WIDE row."""
    out = []
    for d, heads, kv, layers, vocab, seq, tp, pp, shard, ac, micro, accum, moe, *extra in WIDE:
        over = ["data.synthetic=markov", f"model.d_model={d}", f"model.n_heads={heads}", f"model.n_kv_heads={kv}",
                f"model.n_layers={layers}", f"model.vocab_size={vocab}", f"data.seq_len={seq}",
                f"model.max_seq_len={seq}", f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.dp_shard={shard}",
                f"parallel.activation_checkpoint={ac}", f"train.micro_batch={micro}",
                f"train.global_batch_tokens={seq * micro * shard * accum}"]
        label = f"d{d} L{layers} V{vocab // 1000}k tp{tp} pp{pp} dp{shard} {ac} s{seq} b{micro} acc{accum}"
        if moe:
            experts, top_k, shared, every = moe
            over += [f"model.moe.n_experts={experts}", f"model.moe.top_k={top_k}",
                     f"model.moe.shared_experts={shared}", f"model.moe.every_n_layers={every}"]
            label += f" moe{experts}x{top_k}" + (f"+{shared}" if shared else "") + (f"/{every}" if every > 1 else "")
        for more in extra:
            over += list(more)
            label += " " + " ".join(o.split(".")[-1] for o in more)
        out.append((label, load_config([], over), tp * pp * shard))
    return out
