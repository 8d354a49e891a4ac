"""Per-GPU memory estimate for one layout, term by term, in bytes.

Terms (mixed-precision AdamW; reference/planner.md "Accounting"):
  weights     kiln's native engine (FSDP2): the fp32 parameters themselves, 4 B/param (bf16 copies
              exist only while a layer is all-gathered); DeepSpeed: bf16 working copy, 2 B/param
  grads       4 B/param (fp32 reduce, as kiln's FSDP2 policy) or 2 B (bf16)
  optimizer   native: Adam m + v, 8 B/param (the fp32 parameters are the master copy); DeepSpeed:
              fp32 master + m + v, 12 B/param. Native total 16 B/param, as `kiln estimate --measure`
              measures (the older 2 + 4 + 12 = 18 over-counted FSDP2 by 2 B/param)
  activations Korthikanti et al. 2022 (arXiv 2205.05198)'s per-layer structure with constants
              measured on kiln's model (ACT_*), times layers per stage, times micro-batches in
              flight (1F1B: min(pp, microbatches) on the first stage)
  logits      12 s b V bytes, measured (Korthikanti sec. 4.3 counts 4 s b V); other constants
              under TP, on a pipeline's last stage and under DeepSpeed (logits_bytes)
  comm        FSDP all-gather of two unsharded bf16 layers (current + prefetch) and one fp32
              reduce-scatter layer (a dense one for MoE: experts are gathered in backward, see
              peaks.py); DeepSpeed's reduce bucket; DDP gradient buckets (2 x 25 MB);
              TP/SP and pipeline send/receive buffers of 2 s b h bytes each.
  context     context parallelism (cp > 1): every sequence-proportional term above uses the cp rank's
              s / cp tokens; kiln's ring attention (kiln/parallel/context.py) also keeps fp32 copies of
              q, k, v and the attention output per layer, and its ring holds k/v (and in backward their
              gradients) in flight plus one block's scores, probabilities and their gradient.
Parameters are split by TP (matrices; norms replicated) and PP (layers; embedding on the first
stage, output on the last); ZeRO stage z shards optimizer (z>=1), grads (z>=2) and weights (z=3)
over the data-parallel shard degree. With a pipeline, the activation terms are those of the fuller
stage: the first (1F1B keeps min(pp, micro-batches) in flight) or the last (one micro-batch and
the logits); both hold one vocabulary table.
The total is the largest of the step's peaks, not the sum of every term: the one at the loss and
the ones after it (the end of backward, which wins with few tokens per micro-batch; a MoE layer's
backward; a pipeline's stage kept gathered under FSDP; DeepSpeed's gradient reduction and step: all
in kiln/planner/peaks.py). Every constant was measured with `kiln estimate --measure`
(bench/planner_memory.py); `fits` adds the margin that covers the formula's error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from kiln.config import ModelConfig
from kiln.planner.peaks import (DEEPSPEED_REDUCE_BUCKET, deepspeed_peak, end_of_backward_bytes,
                                moe_backward_start_bytes, pipeline_fsdp_peak)

GIB = 2 ** 30
DDP_BUCKETS = 2 * 25 * 2 ** 20  # torch DDP default bucket_cap_mb=25, two in flight


@dataclass
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1  # total data-parallel degree (replicate x shard)
    dp_shard: int | None = None  # ZeRO/FSDP shard degree; None: equal to dp (x cp for the native engine)
    cp: int = 1  # context parallel: ranks that split each sequence (ring attention)
    zero: int = 3  # 3 for FSDP (kiln's native engine), DeepSpeed's zero_stage otherwise
    micro_batch: int = 1  # sequences per pipeline micro-batch (per forward)
    pp_microbatches: int = 1  # pipeline micro-batches per step (1 when pp == 1)
    grad_accum: int = 1
    activation_checkpoint: str = "none"  # none | selective | full
    sequence_parallel: bool = True
    schedule: str = "1f1b"
    engine: str = "native"  # native (FSDP2, fp32 params) | deepspeed (bf16 params + fp32 master)
    fused_optimizer: bool = True  # AdamW's fused kernel (kiln's default on GPUs): no step temporaries
    grouped_experts: bool = True  # MoE experts through torch._grouped_mm (sm90+, as --measure runs them)

    @property
    def shard(self) -> int:
        return self.dp * self.cp if self.dp_shard is None else self.dp_shard

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp * self.cp


def layer_matrix_params(m: ModelConfig, tp: int = 1, moe_share: float | None = None) -> float:
    """Matrix parameters of an average block on one GPU of a tp group. MoE blocks hold every expert
    and the router (memory counts all parameters, FLOPs only the active ones); kiln's TP splits the
    attention, the dense MLP and the shared experts, and replicates the routed experts and the
    router on every TP rank (expert parallelism, `parallel.ep`, is not modelled). `moe_share`: the
    fraction of the blocks that are MoE (default: the model's)."""
    d = m.d_model
    d_q, d_kv = m.n_heads * m.dim_per_head, m.kv_heads * m.dim_per_head
    dense = 2 * d * d_q + 2 * d * d_kv + 3 * d * m.ffn_hidden
    if m.moe is None:
        return dense / tp
    moe_share = m.n_moe_layers / m.n_layers if moe_share is None else moe_share
    shared = m.moe.shared_experts * 3 * d * m.ffn_hidden
    routed = m.moe.n_experts * 3 * d * m.ffn_hidden + d * m.moe.n_experts
    split = dense + moe_share * (shared - 3 * d * m.ffn_hidden)
    return split / tp + moe_share * routed


def fullest_stage_moe_share(m: ModelConfig, pp: int) -> float | None:
    """The largest fraction of MoE blocks in any pipeline stage (kiln's contiguous stages, as
    `layers_per_stage` splits them; layer i is MoE when (i + 1) % every_n_layers == 0)."""
    from kiln.parallel.pipeline import layers_per_stage

    if m.moe is None:
        return None
    shares, start = [], 0
    for count in layers_per_stage(m.n_layers, pp):
        if count:
            shares.append(sum((i + 1) % m.moe.every_n_layers == 0 for i in range(start, start + count)) / count)
        start += count
    return max(shares)


def stage_params(m: ModelConfig, tp: int, pp: int) -> float:
    """Parameters held by one GPU of the largest pipeline stage before ZeRO sharding."""
    layers = math.ceil(m.n_layers / pp)
    per_layer = layer_matrix_params(m, tp, fullest_stage_moe_share(m, pp)) + 2 * m.d_model
    tables = m.vocab_size * m.d_model / tp
    if pp == 1:
        edges = tables * (1 if m.tie_embeddings else 2) + m.d_model
    else:
        edges = tables + m.d_model  # the last stage: output matrix and final norm
    return layers * per_layer + edges


# Bytes per s*b*h per layer stored for backward by kiln's model (SwiGLU, fp32 RMSNorm, bf16,
# flash attention), measured with `kiln estimate --measure` (MemTracker under fake tensors, the
# difference between 4 and 2 layers): 50 without recomputation (Korthikanti's 34 is a GeLU-MLP
# figure), 25 with selective recomputation (measured 25.06 at d 512, s 1024, b 2 under FSDP2), 2.5
# with full recomputation (the layer input plus its norm statistics; measured 2.25).
ACT_NONE, ACT_SELECTIVE, ACT_FULL = 50.0, 25.0, 2.5
# MoE layers, per s*b*h, measured (L4 - L2 layers of MoE everywhere, d 512, tp 1 and 2, 4-8 experts,
# top-1/2, 0-1 shared experts, dropless and capacity 1.25 under balanced routing): kiln's SwiGLU MLP
# saves 2 + 8 f/h bytes without recomputation and 2 + 4 f/h with selective (f = ffn_hidden; 23.5 and
# 12.8 at the f/h 2.69 the ACT_* constants were measured at, MLP_REF_*). A MoE layer replaces that
# MLP with its shared experts (split by TP as the MLP is), a router (MOE_ROUTER) and top_k expert
# passes of an MLP's bytes plus the dispatch (MOE_DISPATCH) each; kiln's TP replicates the routed
# experts, so every TP rank routes the whole sequence and those passes are not divided by t.
# Selective recomputation saves none of the routed experts' bytes when they run as one
# torch._grouped_mm (sm90+ GPUs, and --measure); the per-expert loop elsewhere (A100, V100) saves its
# matrix products as a dense MLP's, and the dispatch (measured at d 1024, top-2: without them the
# formula read 0.61).
MOE_ROUTER, MOE_DISPATCH = 4.0, 4.0
MLP_REF_NONE, MLP_REF_SELECTIVE = 23.5, 12.8
# Logits peak: bf16 logits, their fp32 upcast, log-softmax and its gradient: 12 s b V bytes
# measured (3x Korthikanti's 4 s b V).
LOGITS_BYTES = 12.0


# Pipeline last stage: the logits peak measured 14-15 s b V bytes beside the output layer's fp32
# gradient (the schedule also keeps the stage's output and the loss's fp32 input until backward),
# against 12 without a pipeline.
LOGITS_BYTES_PIPELINE = 15.0
# DeepSpeed: measured 12.3-12.4 s b V at d 1024 and 4096 with 4096-token sequences, where the logits
# outweigh its bucket (an earlier 6, fitted on 40-60M models whose peak is the bucket, was wrong).
LOGITS_BYTES_DEEPSPEED = 12.5
TP_LOGITS_BYTES, TP_LOGITS_BYTES_SPLIT = 8.5, 6.0
# GPipe's last stage runs every micro-batch's forward (and loss) before any backward: each keeps its
# fp32 logits for the loss's backward (measured at d 1536, V 64k, 4 micro-batches: without this the
# formula read 0.79).
GPIPE_SAVED_LOGIT_BYTES = 4.0


def logits_bytes(layout: Layout) -> float:
    """Bytes per logit (s b V) at the loss, as measured. Under kiln's TP the logits stay vocab-sharded
    into `loss_parallel`, yet the measured peak shrinks far less than 1/t (about 11.2 s b V at t=2
    and 10 at t=4, with or without a pipeline). Fitted: 8.5 + 6/t."""
    if layout.engine == "deepspeed":
        return LOGITS_BYTES_DEEPSPEED
    if layout.tp > 1:  # measured the same with and without a pipeline
        return TP_LOGITS_BYTES + TP_LOGITS_BYTES_SPLIT / layout.tp
    return LOGITS_BYTES_PIPELINE if layout.pp > 1 else LOGITS_BYTES


def activation_bytes_per_layer(m: ModelConfig, seq_len: int, micro_batch: int, tp: int,
                               sequence_parallel: bool, checkpoint: str, flash: bool = True,
                               grouped_experts: bool = True) -> float:
    """Korthikanti et al. 2022, Table 2's structure with kiln's measured constants (ACT_*): the
    terms TP shards (all with sequence parallelism) divide by t; without SP, the 10/34 of the
    stored bytes that are layer inputs and norms stay replicated. Without flash attention the
    5 a s / h score term of Korthikanti is added."""
    s, b, h, a, t = seq_len, micro_batch, m.d_model, m.n_heads, tp
    sbh = s * b * h
    scores = 0.0 if flash else 5 * a * s / (h * t)
    sp = sequence_parallel and t > 1
    if checkpoint == "full":
        return ACT_FULL * sbh / (t if sp else 1)
    base = ACT_SELECTIVE if checkpoint == "selective" else ACT_NONE
    if t == 1 or sp:
        per = base / t
    else:
        per = base * (10 / 34) + base * (24 / 34) / t
    if m.moe is not None:
        per += moe_layer_extra_bytes(m, t, checkpoint, grouped_experts) * m.n_moe_layers / m.n_layers
    return sbh * (per + (0.0 if checkpoint == "selective" else scores))


def moe_layer_extra_bytes(m: ModelConfig, tp: int, checkpoint: str, grouped: bool = True) -> float:
    """Bytes per s*b*h a MoE layer saves beyond a dense one (see MOE_ROUTER); 0 under full
    recomputation, which keeps only the layer's input either way. `grouped`: the experts run as
    torch._grouped_mm (see Layout.grouped_experts)."""
    if checkpoint == "full":
        return 0.0
    f = m.ffn_hidden / m.d_model
    selective = checkpoint == "selective"
    mlp = 2 + (4 if selective else 8) * f
    # the shared experts in place of the dense MLP the ACT_* constants include
    shared = (m.moe.shared_experts * mlp - (MLP_REF_SELECTIVE if selective else MLP_REF_NONE)) / tp
    if selective:
        return shared + (0.0 if grouped else m.moe.top_k * (mlp + MOE_DISPATCH))
    return shared + MOE_ROUTER + m.moe.top_k * (mlp + MOE_DISPATCH)


def ring_attention_bytes(m: ModelConfig, seq_len: int, micro_batch: int, tp: int, cp: int) -> tuple[float, float]:
    """(stored per layer, transient) bytes of kiln's ring attention on one cp rank of `cp`: the fp32
    q, k, v and output it saves for backward; k/v and their fp32 gradients in flight (sent and
    received), and the scores, probabilities and score gradient of one (s/2cp)^2 block."""
    from kiln.parallel.context import TILE_ELEMENTS

    if cp == 1:
        return 0.0, 0.0
    tokens = seq_len / cp * micro_batch
    d_q, d_kv = m.n_heads * m.dim_per_head / tp, m.kv_heads * m.dim_per_head / tp
    stored = 4 * tokens * (2 * d_q + 2 * d_kv)
    chunk = seq_len / (2 * cp)
    row = micro_batch * (m.n_heads / tp) * chunk  # score elements of one query row over all heads
    tile = min(row * chunk, max(TILE_ELEMENTS, row))  # the block is computed in query-row tiles
    transient = 2 * 2 * (4 * tokens * 2 * d_kv) + 3 * 4 * tile
    return stored, transient


def memory_breakdown(m: ModelConfig, seq_len: int, layout: Layout, grad_bytes: int = 4,
                     flash: bool = True) -> dict[str, float]:
    """Bytes per GPU for each term, plus 'total'. Under context parallelism each GPU holds s / cp
    tokens of every sequence, so the activation, logits and buffer terms use that length."""
    p = stage_params(m, layout.tp, layout.pp)
    z, shard = layout.zero, layout.shard
    native = layout.engine == "native"
    weights = (4 if native else 2) * p / (shard if z >= 3 else 1)
    if not native:
        grad_bytes = 2  # DeepSpeed bf16: gradients in the parameters' dtype (measured 2 B/param)
    grads = grad_bytes * p / (shard if z >= 2 else 1)
    optimizer = (8 if native else 12) * p / (shard if z >= 1 else 1)

    b, t, cp = layout.micro_batch, layout.tp, layout.cp
    ring_stored, ring_transient = ring_attention_bytes(m, seq_len, b, t, cp)
    seq_len = seq_len // cp
    per_layer = activation_bytes_per_layer(m, seq_len, b, t, layout.sequence_parallel,
                                           layout.activation_checkpoint, flash or cp > 1, layout.grouped_experts)
    if layout.activation_checkpoint != "full":  # full recompute keeps only each layer's input
        per_layer += ring_stored
    layers = math.ceil(m.n_layers / layout.pp)
    if layout.pp == 1:
        in_flight = 1
    elif layout.schedule == "gpipe":
        in_flight = layout.pp_microbatches
    else:
        in_flight = min(layout.pp, layout.pp_microbatches)
    recompute = 0.0
    if layout.activation_checkpoint == "full":  # one layer's activations live during its recompute
        recompute = activation_bytes_per_layer(m, seq_len, b, t, layout.sequence_parallel, "none",
                                               flash or cp > 1) + ring_stored
    logits = seq_len * b * m.vocab_size * logits_bytes(layout)
    # Without a pipeline the recomputed layer lives in backward, after the loss has freed the logits'
    # temporaries: the peak holds the larger of the two, not both (measured: the sum read 15-18% high
    # at 8B widths). A pipeline's last stage holds both (its sum measured 3% low at 8B widths).
    activations = layers * per_layer * in_flight + (recompute if layout.pp > 1 else max(0.0, recompute - logits))
    if layout.pp > 1:  # the fuller of the first stage (in flight) and the last (one micro-batch + logits)
        if native:  # 1F1B's last stage makes the output layer's fp32 gradient beside the logits
            logits += 4 * m.vocab_size * m.d_model / t
        last = layers * per_layer * (in_flight if layout.schedule == "gpipe" else 1) + recompute
        if layout.schedule == "gpipe":  # each earlier micro-batch's loss keeps its fp32 logits for backward
            logits += GPIPE_SAVED_LOGIT_BYTES * (in_flight - 1) * seq_len * b * m.vocab_size / t
        if activations >= last + logits:
            logits = 0.0
        else:
            activations = last
    if native and layout.dp * layout.cp == 1 and layout.pp == 1:
        # No FSDP, so bf16 compute comes from autocast, whose bf16 copies of the weight matrices are
        # saved for backward: 2 bytes per matrix parameter (the embedding lookup is not cast). With a
        # pipeline the measured peaks do not show them (cause not established), so none are added.
        lookup = 0.0 if m.tie_embeddings else m.vocab_size * m.d_model / t
        norms = (2 * layers + 1) * m.d_model
        activations += 2 * (p - lookup - norms)

    layer_p = layer_matrix_params(m, t)
    if not native and z >= 1:
        comm = DEEPSPEED_REDUCE_BUCKET
        if z >= 3:  # ZeRO-3 keeps a vocabulary table and a layer gathered (bf16) at the loss
            comm += 2 * m.vocab_size * m.d_model + 2 * layer_p
    elif z >= 3 and shard > 1:
        # Measured on dense layers; a MoE layer's experts are not gathered at the loss (they are in
        # backward: moe_backward_start_bytes), except on a pipeline stage, where the sum held.
        gathered = layer_p if m.moe is None or layout.pp > 1 else layer_matrix_params(m, t, 0.0)
        comm = 2 * 2 * gathered + 4 * gathered
    else:
        comm = DDP_BUCKETS if layout.dp > 1 else 0
    sbh2 = 2 * seq_len * b * m.d_model
    comm += (sbh2 if t > 1 else 0) + (2 * sbh2 if layout.pp > 1 else 0) + ring_transient
    terms = {"weights": weights, "grads": grads, "optimizer": optimizer, "activations": activations,
             "logits": logits, "comm_buffers": comm}
    # Without accumulation the peak is at the loss, before backward allocates any gradient (as
    # measured); with accumulation (or, without FSDP, a pipeline's micro-batches) gradients live
    # through forward. FSDP reduce-scatters each micro-batch's gradients (measured: none at the peak).
    holds_grads = layout.grad_accum > 1 or (layout.pp > 1 and shard == 1)
    if native:
        at_loss = sum(terms.values()) - (0.0 if holds_grads else grads)
        peaks = [at_loss, end_of_backward_bytes(m, layout, weights, grads, optimizer, activations)]
        if layout.pp > 1 and shard > 1:
            peaks.append(pipeline_fsdp_peak(m, layout, p, weights, grads, optimizer,
                                            layers * per_layer, in_flight, recompute, seq_len * b))
        if m.moe is not None and layout.pp == 1 and shard > 1:
            held = weights + optimizer + activations + (grads if holds_grads else 0.0)
            peaks.append(moe_backward_start_bytes(m, layout, held))
        terms["total"] = max(peaks)
    else:
        terms["total"] = deepspeed_peak(m, layout, p, terms, holds_grads)
    return terms


# The formula against `kiln estimate --measure` (bench/planner_memory.py: 400 seeded layouts; the
# 8B-width layouts and the 25 at d 1024-5120 of layouts.WIDE): its lowest reading on a dense
# model was 0.962 of the measured peak. A layout fits when its total with this margin is within the
# usable memory, so the formula does not say "fits" where the measured step does not. It reads high
# by up to 20-33% on a few layouts (ZeRO-3, TP x PP with short sequences, small MoE models under
# TP): `--measure` settles those.
FIT_MARGIN = 1.05
# MoE models: checked on 72 seeded layouts and 14 at d 1024-2048, the lowest readings 0.921 (a
# pipeline without FSDP, full recompute, MoE every second layer) and 0.945, so their margin is 10%.
FIT_MARGIN_MOE = 1.10


def fit_margin(m: ModelConfig) -> float:
    """The margin a layout of this model needs on top of the formula's total."""
    return FIT_MARGIN if m.moe is None else FIT_MARGIN_MOE


def fits(total: float, usable: float, m: ModelConfig) -> bool:
    """Whether a formula total for model `m` fits `usable` bytes, with the margin for the formula's
    error on such a model (`fit_margin`)."""
    return total * fit_margin(m) <= usable


def longest_seq_len(m: ModelConfig, layout: Layout, usable_bytes: float, grad_bytes: int = 4,
                    flash: bool = True, limit: int = 2 ** 24) -> int:
    """The longest sequence (tokens, a multiple of what the layout needs: 2*cp chunks, split by tp
    under sequence parallelism) whose per-GPU total `fits` in `usable_bytes`; 0 if none does. Memory
    grows with the length, so a binary search over multiples of that unit finds it."""
    unit = 2 * layout.cp if layout.cp > 1 else 1
    if layout.sequence_parallel and layout.tp > 1:
        unit = unit * layout.tp // math.gcd(unit, layout.tp)

    def fits_units(units: int) -> bool:
        return fits(memory_breakdown(m, units * unit, layout, grad_bytes, flash)["total"], usable_bytes, m)

    lo, hi = 0, limit // unit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits_units(mid) else (lo, mid - 1)
    return lo * unit
