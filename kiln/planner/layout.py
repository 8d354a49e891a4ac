"""Layout search: tp / pp / dp, FSDP, activation recomputation and micro-batch for a GPU count.

Preference order (the first layout whose estimate fits wins): least model parallelism
(tp x pp), then TP before PP (TP stays inside an 8-GPU node), then no recomputation before
selective before full, then the largest micro-batch. FSDP (ZeRO-3 over all data-parallel
ranks) is always on: kiln's native engine shards with FSDP2. Global batch follows DeepSeek's
B_opt, rounded to whole micro-batches per data-parallel rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from kiln.config import ModelConfig
from kiln.errors import KilnError
from kiln.hardware import Accelerator
from kiln.planner.memory import GIB, Layout, fits, memory_breakdown

DEFAULT_HEADROOM = 0.9  # usable fraction of device memory: CUDA context, NCCL, fragmentation
GPUS_PER_NODE = 8
CHECKPOINTS = ("none", "selective", "full")
MICRO_BATCHES = (16, 8, 4, 2, 1)


@dataclass
class Plan:
    layout: Layout
    memory: dict
    global_batch_tokens: int


def usable_bytes(acc: Accelerator, headroom: float = DEFAULT_HEADROOM) -> float:
    return acc.memory_bytes * headroom


def _divides(m: ModelConfig, tp: int) -> bool:
    return m.tp_conflict(tp) is None


def _batching(target_tokens: float, seq_len: int, dp: int, b: int, pp: int) -> tuple[int, int, int]:
    """(pipeline micro-batches, grad accumulation, global batch tokens) for a target batch."""
    per_rank = max(1, round(target_tokens / seq_len / dp))
    chunks = max(1, math.ceil(per_rank / b))
    if pp > 1:
        chunks = max(chunks, pp)
        return chunks, 1, chunks * b * dp * seq_len
    return 1, chunks, chunks * b * dp * seq_len


def choose_layout(m: ModelConfig, seq_len: int, acc: Accelerator, gpus: int, target_batch_tokens: float,
                  headroom: float = DEFAULT_HEADROOM) -> Plan:
    limit = usable_bytes(acc, headroom)
    candidates = []
    for tp in (1, 2, 4, 8):
        if tp > gpus or gpus % tp or not _divides(m, tp):
            continue
        for pp in (1, 2, 4, 8, 16, 32, 64):
            if gpus % (tp * pp) or m.n_layers % pp or pp > m.n_layers:
                continue
            candidates.append((tp * pp, pp, tp))
    smallest = None
    # First pass: layouts whose smallest global batch (one sequence per DP rank and pipeline
    # chunk) stays within 2x of the target (or of the least any layout allows, gpus/8 sequences),
    # so that huge GPU counts trade data parallelism for TP/PP; then any layout.
    batch_cap = 2 * max(target_batch_tokens, gpus // GPUS_PER_NODE * seq_len)
    for strict in (True, False):
        for _, pp, tp in sorted(candidates):
            dp = gpus // (tp * pp)
            if strict and dp * seq_len * pp > batch_cap:
                continue
            per_rank = max(1, round(target_batch_tokens / seq_len / dp))
            for ac in CHECKPOINTS:
                for b in MICRO_BATCHES:
                    if b > per_rank and b > 1:
                        continue  # a micro-batch this large overshoots the batch-size target
                    chunks, accum, global_tokens = _batching(target_batch_tokens, seq_len, dp, b, pp)
                    layout = Layout(tp=tp, pp=pp, dp=dp, micro_batch=b, pp_microbatches=chunks, grad_accum=accum,
                                    activation_checkpoint=ac, sequence_parallel=tp > 1)
                    mem = memory_breakdown(m, seq_len, layout)
                    if fits(mem["total"], limit, m):
                        return Plan(layout, mem, global_tokens)
                    if smallest is None or mem["total"] < smallest[1]["total"]:
                        smallest = (layout, mem)
    if smallest is None:
        raise KilnError(f"no tp/pp layout divides {gpus} GPUs for this shape (n_heads={m.n_heads}, "
                        f"n_layers={m.n_layers})")
    layout, mem = smallest
    raise KilnError(f"no layout fits {gpus} x {acc.name} ({limit / GIB:.1f} GiB usable each): the best needs "
                    f"{mem['total'] / GIB:.1f} GiB per GPU at tp={layout.tp} pp={layout.pp}; use more GPUs")
