"""The peaks of a training step after its loss, in bytes per GPU, for `memory.memory_breakdown`.

The loss is where most steps peak (activations and logits live). These are the others: the end of
backward on kiln's native engine, where the embedding's dense gradient is made last, or where
whole gradients build up without FSDP; the backward of a MoE layer, which gathers every expert;
and DeepSpeed ZeRO's gradient reduction and optimizer step.
Each constant was measured with `kiln estimate --measure` (bench/planner_memory.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from kiln.config import ModelConfig

if TYPE_CHECKING:
    from kiln.planner.memory import Layout

# DeepSpeed ZeRO allocates its gradient reduce bucket at full size, reduce_bucket_size (5e8 elements
# by default, kiln does not change it) x 2 bytes (bf16), even for a model smaller than the bucket.
DEEPSPEED_REDUCE_BUCKET = 5e8 * 2


def bf16_tables(m: ModelConfig) -> float:
    """Bytes of the bf16 vocabulary tables (embedding, and the output layer unless tied), gathered."""
    return 2 * m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)


def deepspeed_peak(m: ModelConfig, layout: Layout, params: float, terms: dict[str, float], holds_grads: bool) -> float:
    """DeepSpeed ZeRO's peak: the larger of the one at the loss (model state, activations, logits;
    gradients too when they are held across micro-batches) and the ones at the gradient reduction
    and the step. ZeRO-1/2 hold every bf16 gradient (2 B/param) beside the reduce bucket or, at the
    step, the fp32 gradient partition (4 B/param / shard); when the bucket is allocated, at the first
    gradient, every activation is still held (and, ZeRO-2 with accumulation, the fp32 partition).
    ZeRO-3 at the step holds its bf16 and fp32 gradient partitions (6 B/param / shard) beside the
    bucket; in backward, 2 B/param / shard of gradient partition and twice the bf16 tables
    (gathered, and their gradients).
    Measured with `--measure` at d 1024 and 4096, shard 2 and 8, sequences 1024 and 4096: the peaks
    never coincide, so the older sum of every term read up to 26% high and, at 8B widths, its
    6 B/logit 12% low."""
    z, shard = layout.zero, layout.shard
    bucket = DEEPSPEED_REDUCE_BUCKET if z >= 1 else 0.0
    state = terms["weights"] + terms["optimizer"] + terms["comm_buffers"] - bucket
    at_loss = state + terms["activations"] + terms["logits"] + (terms["grads"] if holds_grads else 0.0)
    if z >= 3:
        partitions = terms["weights"] + terms["optimizer"]
        at_reduce = max(partitions + 6 * params / shard, partitions + 2 * params / shard + 2 * bf16_tables(m))
        at_reduce += bucket
    else:  # the bucket is allocated at the first gradient (the output layer's), activations all held
        at_reduce = max(state + 2 * params + max(bucket, 4 * params / (shard if z >= 1 else 1)),
                        state + bucket + terms["activations"] + bf16_tables(m) / 2
                        + (4 * params / shard if z == 2 and layout.grad_accum > 1 else 0.0))
    return max(at_loss, at_reduce)


# End of backward (native engine): the embedding's gradient is made last, dense over the whole
# vocabulary, while every other gradient is already reduced and the optimizer state is resident.
# Measured with `kiln estimate --measure` (bench/planner_memory.py), per entry of a tp rank's
# vocabulary slice, under FSDP2: 10 bytes (its bf16 gradient, the fp32 copy FSDP2 reduces and the
# reduce-scatter buffer), 14 with accumulation (the running sum is added to). AdamW without its
# fused kernel (`optim.fused: false`) makes a temporary fp32 copy of the state it updates at the step
# (measured +43% of Adam's 8 B/param, taken as 50%). Without FSDP, gradients held across
# micro-batches (accumulation, a pipeline) peak in the output layer's backward 8 bytes per entry of
# the whole vocabulary table above model state: at tp 1, autocast's bf16 copy of the output matrix,
# its bf16 gradient and the fp32 cast that is added to the running sum (2 + 2 + 4). Measured at d
# 512/1024, V 32k/64k, tp 1-8: the same at every tp, not divided by t (why is not established),
# plus under TP one fp32 slice of the table.
EMBED_GRAD_BYTES, EMBED_GRAD_BYTES_ACCUM = 10.0, 14.0
# Beside it, under FSDP2, the backward of layer 0 (the last one): its gathered bf16 weights, their
# bf16 gradient and the fp32 copy FSDP2 reduce-scatters, 2 + 2 + 4 bytes per parameter. Small next to
# the embedding's for a dense model; a MoE layer holds every expert (measured at d 2048, 12 layers of
# 8 experts, FSDP over 8, tp 1-4: the formula read 0.84-0.96 of the peak without it, 0.95-1.01 with
# it). When layer 0 is dense, the lowest MoE layer's backward is the other candidate: the gradients
# of the layers below it not made yet, the gathered bf16 vocabulary tables resident (measured on the
# seeded MoE layouts with a MoE layer every second layer).
LAYER_GRAD_BYTES = 8.0
UNFUSED_STEP = 0.5
HELD_GRADS_VOCAB_BYTES = 8.0


def end_of_backward_bytes(m: ModelConfig, layout: Layout, weights: float, grads: float, optimizer: float,
                          activations: float) -> float:
    """The other peaks of a step with little activation memory (short sequences, few tokens per
    micro-batch): model state plus the gradient transients of the embedding and of the last layer
    backward reaches (`layer_grad_peak`) under FSDP2; without FSDP,
    whole gradients build up while saved activations are still held (bounded by their sum); the
    optimizer step's temporaries without the fused kernel."""
    state = weights + grads + optimizer
    step = state + (0.0 if layout.fused_optimizer else UNFUSED_STEP * optimizer)
    table = m.vocab_size * m.d_model
    if layout.shard > 1:
        per_entry = EMBED_GRAD_BYTES_ACCUM if layout.grad_accum > 1 else EMBED_GRAD_BYTES
        return max(step, layer_grad_peak(m, layout, state, grads, per_entry * table / layout.tp))
    peaks = [step, state + activations]
    if layout.grad_accum > 1 or layout.pp > 1:
        slice_grad = 4 * table / layout.tp if layout.tp > 1 else 0.0
        peaks.append(state + activations + HELD_GRADS_VOCAB_BYTES * table + slice_grad)
    return max(peaks)


def layer_grad_peak(m: ModelConfig, layout: Layout, state: float, grads: float, embedding: float) -> float:
    """FSDP2's peak in the backward of layer 0, beside the embedding's gradient (`embedding` bytes),
    or, when layer 0 is dense, in that of the lowest MoE layer (see LAYER_GRAD_BYTES)."""
    from kiln.planner.memory import layer_matrix_params

    peak = state + embedding
    if m.moe is None:
        return peak
    first_moe = m.moe.every_n_layers - 1  # layer i is MoE when (i + 1) % n == 0
    moe_layer = layer_matrix_params(m, layout.tp, 1.0)
    if first_moe == 0:  # beyond a dense layer's transient, which EMBED_GRAD_BYTES was fitted with
        peak += LAYER_GRAD_BYTES * (moe_layer - layer_matrix_params(m, layout.tp, 0.0))
    else:
        not_made = grads * first_moe / m.n_layers
        peak = max(peak, state - not_made + bf16_tables(m) / layout.tp + LAYER_GRAD_BYTES * moe_layer)
    return peak


def moe_backward_start_bytes(m: ModelConfig, layout: Layout, held: float) -> float:
    """FSDP2's peak in the backward of the topmost MoE layer: every saved activation still `held`
    (with model state), the layer gathered with its gradient transients (LAYER_GRAD_BYTES per
    parameter, every expert) and the gathered bf16 vocabulary tables. Measured at d 2048 with 8
    experts: it is the step's peak without recomputation (the loss's, with the experts not gathered,
    is lower)."""
    from kiln.planner.memory import layer_matrix_params

    return held + bf16_tables(m) / layout.tp + LAYER_GRAD_BYTES * layer_matrix_params(m, layout.tp, 1.0)


# A pipeline under FSDP2: torch's schedules run every micro-batch's backward without resharding or
# reducing (set_reshard_after_backward(False), set_requires_gradient_sync(False)) and reduce after
# the last one, so from the first backward on a stage keeps its parameters gathered (bf16, 2 bytes
# per parameter) and its gradients unsharded (fp32, 4): beside the first stage's micro-batches still
# held, or the last stage's one with its logits' fp32 and bf16 gradients (6 bytes per logit), and
# in the reduction beside the sharded gradients and one layer's fp32 buffer. Measured on 14 layouts
# at d 1536-5120, pp 2 x FSDP 2-4, 2-16 micro-batches, dense and MoE (layouts.WIDE): without this
# peak the formula read 0.62-0.83 of the measured step on 7 of them; with it, 0.96-1.09.
PP_UNSHARDED_BYTES, PP_LOGITS_GRAD_BYTES = 6.0, 6.0


def pipeline_fsdp_peak(m: ModelConfig, layout: Layout, stage_params: float, weights: float, grads: float,
                       optimizer: float, micro_batch_activations: float, in_flight: int, recompute: float,
                       tokens: float) -> float:
    """A pipeline stage's peak under FSDP2 once its first backward has run (see PP_UNSHARDED_BYTES).
    `micro_batch_activations`: one micro-batch's saved activations on the stage; `tokens`: per
    micro-batch."""
    from kiln.planner.memory import layer_matrix_params

    held = grads if layout.grad_accum > 1 else 0.0
    # After the first backward: 1F1B's steady state keeps `in_flight` micro-batches when there are more
    # than that; otherwise (and under GPipe) the rest of the micro-batches the first backward left.
    steady = layout.schedule != "gpipe" and layout.pp_microbatches > in_flight
    first = (in_flight if steady else max(in_flight - 1, 1)) * micro_batch_activations
    last = micro_batch_activations + PP_LOGITS_GRAD_BYTES * tokens * m.vocab_size / layout.tp
    reduce = grads + 4 * layer_matrix_params(m, layout.tp, None if m.moe is None else 1.0)
    return weights + optimizer + PP_UNSHARDED_BYTES * stage_params + max(max(first, last) + recompute + held, reduce)
