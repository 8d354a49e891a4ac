"""`parallelize(model, mesh, cfg)`: tensor/sequence parallel, context parallel (ring attention),
activation checkpointing, compile, FSDP2/HSDP, in that order (as torchtitan does), on a plain kiln Transformer or a pipeline stage
of one. Parameter names never change (composable APIs only), so checkpoints load across layouts.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from kiln.config import Config
from kiln.model.moe import MoEFeedForward


def parallelize(model: nn.Module, mesh: DeviceMesh | None, cfg: Config, device: torch.device) -> nn.Module:
    p = cfg.parallel
    expert_parallel = mesh is not None and p.ep > 1
    if expert_parallel:
        from kiln.parallel.expert import apply_expert_parallel

        apply_expert_parallel(model, mesh["ep"], mesh["ep", "tp"] if mesh["tp"].size() > 1 else None)
    if mesh is not None and mesh["tp"].size() > 1:
        apply_tensor_parallel(model, mesh["tp"], p.sequence_parallel)
    if mesh is not None and mesh["cp"].size() > 1:
        from kiln.parallel.context import apply_context_parallel

        apply_context_parallel(model, mesh["cp"])
    if p.activation_checkpoint != "none":
        apply_activation_checkpointing(model, p.activation_checkpoint)
    if compile_enabled(p.compile, device):
        for block in model.layers.values():
            block.compile()
    dp_mesh = data_parallel_mesh(mesh)
    if dp_mesh is not None:
        if expert_parallel:
            from kiln.parallel.expert import shard_experts

            shard_experts(model, mesh["expert_dp"], **fsdp_options(cfg, device))
        apply_fsdp(model, dp_mesh, p.reshard_after_forward, mixed_precision_dtype(cfg, device))
    return model


def fsdp_options(cfg: Config, device: torch.device) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=mixed_precision_dtype(cfg, device), reduce_dtype=torch.float32)
    return {"reshard_after_forward": cfg.parallel.reshard_after_forward, "mp_policy": policy}


def compile_enabled(mode: bool | str, device: torch.device) -> bool:
    """`parallel.compile`: true/false as given; `auto` compiles each block on CUDA, where Inductor's
    fused kernels (norms, RoPE, SwiGLU) beat eager, and stays eager on CPU, where compiling costs
    seconds per run for little gain on the matmul-bound step."""
    if mode == "auto":
        return device.type == "cuda"
    return bool(mode)


def mixed_precision_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """bf16 parameters/compute on GPU by default; fp32 on CPU unless asked (gradients reduce in fp32)."""
    mode = cfg.parallel.mixed_precision
    if mode == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if mode == "bf16" else torch.float32


def data_parallel_mesh(mesh: DeviceMesh | None) -> DeviceMesh | None:
    """The FSDP mesh: 2-D (replicate, shard) for HSDP, 1-D dp_shard for FSDP, None without DP.
    Context-parallel ranks hold different tokens of one sequence, so for gradients they are data
    ranks too: FSDP shards and averages over dp_shard x cp (torchtitan's dp_shard_cp)."""
    if mesh is None:
        return None
    rep, shard, cp = mesh["dp_replicate"].size(), mesh["dp_shard"].size(), mesh["cp"].size()
    if rep * shard * cp == 1:
        return None
    if cp == 1:
        return mesh["dp_replicate", "dp_shard"] if rep > 1 else mesh["dp_shard"]
    if id(mesh) not in _WITH_CP:  # flattening builds process groups: once per mesh
        if rep == 1:
            dp = mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        else:
            dp = mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")._unflatten(
                0, (rep, shard * cp), ("hsdp_replicate", "hsdp_shard_cp"))
        _WITH_CP[id(mesh)] = (mesh, dp)  # the mesh stays referenced, so its id is not reused
    return _WITH_CP[id(mesh)][1]


_WITH_CP: dict = {}


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Megatron-style TP through DTensor: q/k/v and w1/w3 column-wise, wo and w2 row-wise,
    vocab-parallel embedding and output (logits stay vocab-sharded for `loss_parallel`). With
    sequence parallel the norms and the residual stream are sharded along the sequence."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    seq = Shard(1) if sequence_parallel else Replicate()
    top = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    if model.norm is not None and sequence_parallel:
        top["norm"] = SequenceParallel()
    if model.output is not None:
        top["output"] = ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=False)
    if top:
        parallelize_module(model, tp_mesh, top)
    if model.tok_embeddings is not None:
        model.tok_embeddings.forward = functools.partial(_vocab_parallel_lookup, model.tok_embeddings, tp_mesh)
    if model.norm is not None and not sequence_parallel:
        replicate_on_mesh(model.norm, tp_mesh)
    tp_rank, tp_size = tp_mesh.get_local_rank(), tp_mesh.size()
    for block in model.layers.values():
        # This rank's query heads start here: ALiBi gives each head its own slope.
        block.attention.head_offset = tp_rank * (block.attention.n_heads // tp_size)
        plan = {
            # (x, rope, doc_ids): only x is a DTensor-to-be; rope and doc_ids stay replicated tensors.
            "attention": PrepareModuleInput(input_layouts=(seq, None, None),
                                            desired_input_layouts=(Replicate(), None, None),
                                            use_local_output=True),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=seq),
        }
        if isinstance(block.feed_forward, MoEFeedForward):
            plan.update(moe_tensor_parallel_plan(block.feed_forward, tp_mesh, seq))
        else:
            plan.update({
                "feed_forward": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),),
                                                   use_local_output=True),
                "feed_forward.w1": ColwiseParallel(),
                "feed_forward.w3": ColwiseParallel(),
                "feed_forward.w2": RowwiseParallel(output_layouts=seq),
            })
        if sequence_parallel:
            plan["attention_norm"] = SequenceParallel()
            plan["ffn_norm"] = SequenceParallel()
        else:
            replicate_on_mesh(block.attention_norm, tp_mesh)
            replicate_on_mesh(block.ffn_norm, tp_mesh)
        parallelize_module(block, tp_mesh, plan)


def _vocab_parallel_lookup(embedding: nn.Embedding, tp_mesh: DeviceMesh, ids) -> torch.Tensor:
    """Megatron's vocab-parallel embedding on the rank's own rows: ids outside its slice read row 0
    and are zeroed, and the partial sums go out through RowwiseParallel's output hook (all-reduce or
    reduce-scatter). DTensor's own rowwise embedding returns a replicated gradient of the whole table
    (measured: tp times the shard's bytes, kept through accumulation); this one's gradient is the
    shard's own rows."""
    from torch.distributed.tensor import DTensor, Partial

    weight = embedding.weight.to_local()
    ids = ids.to_local() if isinstance(ids, DTensor) else ids
    local = ids - tp_mesh.get_local_rank() * weight.shape[0]
    outside = (local < 0) | (local >= weight.shape[0])
    out = nn.functional.embedding(local.masked_fill(outside, 0), weight).masked_fill(outside.unsqueeze(-1), 0)
    return DTensor.from_local(out, tp_mesh, [Partial()], run_check=False)


def moe_tensor_parallel_plan(moe: MoEFeedForward, tp_mesh: DeviceMesh, seq) -> dict:
    """A MoE feed-forward under TP: every TP rank routes the whole (gathered) sequence and runs the
    routed experts whole (router and expert weights replicated DTensors, the model computes on
    their local copies), so each rank holds the full, identical gradient; the shared experts are
    split Megatron-style. The output goes back to the residual stream's layout."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInputOutput, RowwiseParallel

    for module in (moe.router, moe.experts):
        for name, param in list(module.named_parameters(recurse=False)):
            if isinstance(param, DTensor):  # expert parallel placed the experts on (ep, tp) already
                continue
            module.register_parameter(name, nn.Parameter(distribute_tensor(param.data, tp_mesh, [Replicate()]),
                                                         requires_grad=param.requires_grad))
    plan = {"feed_forward": PrepareModuleInputOutput(
        input_layouts=(seq,), desired_input_layouts=(Replicate(),), use_local_input=True,
        output_layouts=(Replicate(),), desired_output_layouts=(seq,), use_local_output=True)}
    if moe.shared is not None:
        plan.update({"feed_forward.shared.w1": ColwiseParallel(), "feed_forward.shared.w3": ColwiseParallel(),
                     "feed_forward.shared.w2": RowwiseParallel(output_layouts=Replicate())})
    return plan


def replicate_on_mesh(module: nn.Module, mesh: DeviceMesh) -> None:
    """Make a module's parameters replicated DTensors (plain tensors in, plain tensors out), so
    that every parameter of a TP model is a DTensor: foreach/fused optimizers refuse a mix."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    def to_dtensor(_module, inputs, device_mesh):
        return tuple(DTensor.from_local(x, device_mesh, [Replicate()], run_check=False)
                     if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x for x in inputs)

    def to_local(_module, output, _device_mesh):
        return output.to_local() if isinstance(output, DTensor) else output

    distribute_module(module, mesh, input_fn=to_dtensor, output_fn=to_local)


def _selective_policy():
    """Save matmul and attention outputs, recompute the cheap pointwise ops (norms, SiLU, RoPE)."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    ops = torch.ops.aten
    save = {ops.mm.default, ops.addmm.default, ops.bmm.default,
            ops._scaled_dot_product_flash_attention_for_cpu.default}
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention"):
        if hasattr(ops, name):
            save.add(getattr(ops, name).default)
    for name in ("_flash_attn_forward", "_flash_attn_varlen_forward"):  # flash-attn >= 2.7 registers these
        try:
            save.add(getattr(torch.ops.flash_attn, name).default)
        except (AttributeError, RuntimeError):
            pass

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return lambda: create_selective_checkpoint_contexts(policy)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Per block: `full` recomputes the whole block in backward; `selective` keeps matmul and
    attention outputs and recomputes the rest. The block's forward is wrapped, not the module, so
    names are unchanged and module hooks (FSDP2's unshard and input cast, which open profiler ranges a
    selective region could not replay) stay outside the checkpointed region, as with torchtitan's
    checkpoint_wrapper."""
    from torch.utils.checkpoint import noop_context_fn

    for block in model.layers.values():
        context_fn = _selective_policy() if mode == "selective" else noop_context_fn
        block.forward = functools.partial(_checkpointed, block.forward, context_fn)


def _checkpointed(forward, context_fn, *args, **kwargs):
    from torch.utils.checkpoint import checkpoint

    return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, reshard_after_forward: bool,
               param_dtype: torch.dtype) -> None:
    """FSDP2 per block, then the root (embedding, norm, output). HSDP when dp_mesh is 2-D.
    Gradients are reduced in fp32 whatever the parameter dtype."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
