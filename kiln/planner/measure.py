"""`kiln estimate --measure`: per-GPU memory measured on kiln's own training step, not a formula.

One rank of the real layout runs one real training step (forward, backward, optimizer step) of
the real model at its real size, on the CPU, with every tensor fake (torch's FakeTensorMode: shapes,
dtypes and devices, no storage), the "fake" process group standing in for the other ranks, and
torch's MemTracker attributing every allocation to parameters, gradients, optimizer state,
activations or temporaries. Nothing is allocated, so a 70B model on 8 GPUs measures in seconds to
minutes on a laptop. The result is the peak of rank 0 or, with a pipeline, of whichever of rank 0
(first stage: the most activations under 1F1B) and the last stage's first rank (output layer and
logits) peaks higher. Caching-allocator fragmentation, CUDA context and NCCL buffers are not
included (the usable headroom covers them).

Fake tensors have shapes but no values, so the few places that read values are answered for the
fake world by `_fake_friendly_setup` (pipeline P2P votes and shape exchange, DeepSpeed's overflow and
cross-rank checks, meshes built inside FSDP, MoE routing: balanced); each such answer is the one a
training step gets (for the router, its balanced steady state).
Interleaved pipeline stages would need another rank's activations first and are refused in one line.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
from typing import Callable

import torch

from kiln.config import Config, grad_accum_steps
from kiln.errors import KilnError

_STAGE_OUTPUTS: dict = {}  # pipeline stage index -> its output metadata, from the rank that ran it
CATEGORIES = {"PARAM": "weights", "BUFFER": "buffers", "GRAD": "grads", "OPT": "optimizer", "ACT": "activations",
              "TEMP": "temporaries", "OTH": "master"}


@contextlib.contextmanager
def _fake_world(world_size: int, rank: int = 0):
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise KilnError("--measure: a process group already exists in this process")
    excepthook = sys.excepthook  # init_process_group wraps it to prefix "[rankN]:", once per world
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        try:
            dist.destroy_process_group()
        finally:
            sys.excepthook = excepthook
        _forget_deepspeed_groups()
        # DTensor caches sharding decisions keyed by meshes that compare equal across fake worlds;
        # a hit would hand the next measurement this world's (destroyed) process groups.
        from torch.distributed.tensor.debug import _clear_sharding_prop_cache

        _clear_sharding_prop_cache()


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches the process groups of the first engine in module globals; a second
    measurement in this process has a new (fake) world."""
    groups, comm = sys.modules.get("deepspeed.utils.groups"), sys.modules.get("deepspeed.comm.comm")
    if groups is not None:
        for name in ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP",
                     "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "mesh_device"):
            if hasattr(groups, name):
                setattr(groups, name, None)
        for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_DATA_PARALLEL_GROUP", "_ALL_TO_ALL_GROUP"):
            if hasattr(groups, name):
                getattr(groups, name).clear()
    if comm is not None:
        comm.cdb = None


@contextlib.contextmanager
def _fake_friendly_setup(deepspeed: bool):
    """setup_parallel calls `model.to(cpu)` on a model already there; with fake parameters torch
    tries to swap them and fails (the fake-tensor cache holds weak references). Skip such moves."""
    original = torch.nn.Module.to

    def to(self, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is None and (device is None or device.type == "cpu"):
            return self
        return original(self, *args, **kwargs)

    import kiln.parallel.runtime as runtime
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    build_mesh = runtime.build_mesh

    def real_mesh(*args, **kwargs):  # a DeviceMesh holds a real rank tensor
        with unset_fake_temporarily():
            return build_mesh(*args, **kwargs)

    from torch.distributed.device_mesh import DeviceMesh

    mesh_init = DeviceMesh.__init__

    def real_mesh_init(self, *args, **kwargs):  # FSDP over TP concatenates meshes inside fully_shard
        with unset_fake_temporarily():
            mesh_init(self, *args, **kwargs)

    # The pipeline schedule's first step votes with its neighbours over P2P and reads the result
    # (`.item()`); the fake process group delivers no values. kiln's stages give no static shapes,
    # so the vote's answer is known: DYNAMIC (shapes inferred by running the stage).
    from torch.distributed.pipelining import schedules
    from torch.distributed.pipelining._utils import InferenceMode

    warmup = schedules._PipelineSchedule._warmup_p2p

    def static_warmup(self, stages, has_backward, p2p_done):
        for stage in stages:
            stage._inference_mode = InferenceMode.DYNAMIC  # shapes inferred by a forward

    schedules._PipelineSchedule._warmup_p2p = static_warmup
    # Its metadata inference then receives, from the next stage, the shapes of the gradients that
    # will arrive: those of this stage's own outputs (kiln's stages pass one activation tensor).
    from torch.distributed.pipelining import stage as pp_stage
    from torch.distributed.pipelining._utils import _StageBackwardMeta

    recv_meta = pp_stage.PipelineStage._recv_meta

    from torch.distributed.pipelining._utils import _StageForwardMeta

    def own_output_meta(self, src_stage):
        if src_stage == self.stage_index + 1:
            _STAGE_OUTPUTS[self.stage_index] = tuple(self._stage_meta.outputs)
            return _StageBackwardMeta(backward_metas=tuple(self._stage_meta.outputs))
        # A later stage's input is what an earlier stage sent: all kiln stages between the
        # embedding and the head pass the same hidden-state tensor, recorded when rank 0 ran.
        if 0 not in _STAGE_OUTPUTS or self.stage_index - 1 not in (0, *_STAGE_OUTPUTS):
            raise KilnError("--measure: this pipeline layout needs activations from another rank before the "
                            "first stage has been measured (interleaved stages); use parallel.pp_virtual_stages=1")
        return _StageForwardMeta(forward_metas=tuple(_local_meta(m) for m in _STAGE_OUTPUTS[0]))

    pp_stage.PipelineStage._recv_meta = own_output_meta
    # MoE routing is the one data-dependent step of the model (which expert takes how many
    # tokens); fake tensors have no values, so every expert takes an equal share, as the formula
    # assumes (a balanced router's steady state), capped at its capacity when one is set.
    from kiln.model.moe import MoEFeedForward

    assign = MoEFeedForward.assign
    MoEFeedForward.assign = _balanced_assign
    undo = _patch_values_deepspeed_reads() if deepspeed else (lambda: None)
    torch.nn.Module.to, runtime.build_mesh, DeviceMesh.__init__ = to, real_mesh, real_mesh_init
    try:
        yield
    finally:
        torch.nn.Module.to, runtime.build_mesh, DeviceMesh.__init__ = original, build_mesh, mesh_init
        schedules._PipelineSchedule._warmup_p2p = warmup
        pp_stage.PipelineStage._recv_meta = recv_meta
        MoEFeedForward.assign = assign
        undo()


def _balanced_assign(self, expert_of: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MoEFeedForward.assign for the fake world: the n assignments split evenly over the experts
    (the first n % experts take one more), each capped at the layer's capacity; the counts are real
    (the expert loop reads them), the order fake."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    n, experts = expert_of.numel(), self.n_experts
    counts = [n // experts + (1 if e < n % experts else 0) for e in range(experts)]
    capacity = self.capacity(n)
    if capacity is not None:
        counts = [min(c, capacity) for c in counts]
    with unset_fake_temporarily():
        real = torch.tensor(counts)
    return torch.arange(sum(counts), device=expert_of.device), real


def _local_meta(meta):
    """A DTensor's metadata names the mesh of the rank that recorded it (another fake world by now):
    keep its local shard only, which TP's input preparation turns back into a DTensor on this mesh."""
    import dataclasses

    from torch.distributed.pipelining._utils import _TensorMeta

    if meta is None or type(meta) is _TensorMeta:
        return meta
    names = {f.name for f in dataclasses.fields(_TensorMeta)}
    return _TensorMeta(**{k: getattr(meta, k) for k in names})


def _patch_values_deepspeed_reads():
    """DeepSpeed's ZeRO optimizers read the gradients' values to detect overflow and a bad norm
    (`.item()`, `bool(tensor)`); fake tensors have none. The answer for a step that trains is known
    ("no overflow, a valid norm"), so give it. Returns the undo function."""
    try:
        import deepspeed.runtime.bf16_optimizer as bf16
        import deepspeed.runtime.zero.stage3 as z3
        import deepspeed.runtime.zero.stage_1_and_2 as z12
    except Exception:  # DeepSpeed absent: the native engine needs none of this
        return lambda: None
    never = staticmethod(lambda *a, **k: False)
    targets = [(z12.DeepSpeedZeroOptimizer, "has_overflow", lambda *a, **k: False),
               (z3.DeepSpeedZeroOptimizer_Stage3, "has_overflow", lambda *a, **k: False),
               (z12.DeepSpeedZeroOptimizer, "_has_inf_or_nan", never),
               (z3.DeepSpeedZeroOptimizer_Stage3, "_has_inf_or_nan", never)]
    targets += [(mod, "is_invalid_grad_norm", lambda *a, **k: False) for mod in (z12, z3, bf16)]
    # ZeRO-3 checks that every rank traced the same module order (ids read back from rank 0)
    import deepspeed.runtime.zero.partition_parameters as z3params
    import deepspeed.runtime.zero.partitioned_param_coordinator as z3coord

    targets += [(mod, "assert_ints_same_as_other_ranks", lambda *a, **k: None) for mod in (z3params, z3coord)]
    saved = [(obj, name, obj.__dict__[name]) for obj, name, _ in targets if name in obj.__dict__]
    for obj, name, fn in targets:
        if name in obj.__dict__:
            setattr(obj, name, fn)

    def restore():
        for obj, name, fn in saved:
            setattr(obj, name, fn)
    return restore


def _step_tracker_class():
    from torch.distributed._tools.mem_tracker import MemTracker

    class StepTracker(MemTracker):
        """MemTracker that accepts a top-level module called once per pipeline micro-batch: its
        per-module statistics restart (only the device-wide peak by category is read here)."""

        def _pre_fw_hook(self, module, inputs):
            if module in self.memory_tracking and not self._mod_tracker.is_bw and \
                    set(self._mod_tracker.parents) <= {"Global", self._mod_tracker.get_known_fqn(module)}:
                del self.memory_tracking[module]
            return super()._pre_fw_hook(module, inputs)

    return StepTracker


def measure(cfg: Config, gpus: int, progress: Callable[[str], None] | None = None) -> dict:
    """Peak bytes per category (and 'total') of the fullest GPU of `cfg` on `gpus` ranks: rank 0, and
    with a pipeline also the first rank of the last stage (the output layer and the logits live
    there); 'rank' and 'stage' say which one it was. `progress(line)`, if given, hears when each
    rank's step starts and how long it took (a large model's step takes CPU-minutes)."""
    import time

    from kiln.config import resolve_world

    world = resolve_world(cfg, gpus)
    ranks = [(0, 0)]
    if world["pp"] > 1:
        ranks.append(((world["pp"] - 1) * (gpus // world["pp"]), world["pp"] - 1))
    _STAGE_OUTPUTS.clear()
    results = []
    for i, (rank, stage) in enumerate(ranks, 1):
        start = time.monotonic()
        if progress:
            progress(f"--measure: rank {rank} ({i} of {len(ranks)}): one fake-tensor training step of "
                     f"{cfg.model.n_layers} layers on the CPU...")
        results.append(dict(_measure_rank(cfg, gpus, rank), rank=rank, stage=stage))
        if progress:
            progress(f"--measure: rank {rank} done in {time.monotonic() - start:.0f} s")
    return max(results, key=lambda r: r["total"])


def _measure_rank(cfg: Config, gpus: int, rank: int) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kiln.distributed import parallel_dims
    from kiln.model import Transformer
    from kiln.optim import build_optimizer
    from kiln.parallel import setup_parallel

    cfg = copy.deepcopy(cfg)
    cfg.train.device = "cpu"
    cfg.parallel.compile = False
    if cfg.parallel.mixed_precision == "auto":
        cfg.parallel.mixed_precision = "bf16"  # what "auto" resolves to on the GPU being estimated
    if cfg.optim.fused == "auto":
        # Likewise the fused AdamW kernel: on the CPU, DTensor shards (and DeepSpeed's flat fp32
        # partition) would get the foreach/single-tensor kernel, whose step makes a temporary fp32
        # copy of the state it updates (measured +43% of Adam's state); the GPU's fused kernel none.
        cfg.optim.fused = True
    cfg.parallel.init = "full"  # fake tensors: "full" init allocates nothing; steady-state memory is the same
    parallel_dims(cfg, gpus)
    if cfg.parallel.ep > 1:
        raise KilnError("--measure: expert parallelism (parallel.ep > 1) exchanges per-expert token counts, "
                        "which fake tensors do not have; measure with parallel.ep=1 (the experts then sit on "
                        "every rank, an upper bound)")
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # DeepSpeed ZeRO-3 replaces torch.nn.functional.linear process-wide and never puts it back;
    # later measurements in this process (autocast layouts) would then read about 5% low.
    linear = torch.nn.functional.linear
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(gpus), "LOCAL_RANK": "0"})
    try:
        with _fake_world(gpus, rank), _fake_friendly_setup(cfg.parallel.engine == "deepspeed"), FakeTensorMode(allow_non_fake_inputs=True):
            model = Transformer(cfg.model)  # fake parameters: shapes only
            rt = setup_parallel(cfg, model, gpus, rank)
            del model
            optimizers = rt.build_optimizers(lambda part: build_optimizer(part, cfg.optim, rt.device,
                                                                          distributed=gpus > 1))
            accum = grad_accum_steps(cfg, rt.dp_size)
            tracker = _step_tracker_class()()
            batch = {"input": torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch, cfg.data.seq_len)),
                     "target": torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch, cfg.data.seq_len))}
            # An untracked first step creates the optimizer state; the tracked step then sees the
            # steady state. With accumulation, gradients already exist while the activations of a
            # later micro-batch build up, so they are kept for the tracked backward.
            if cfg.parallel.engine == "deepspeed":
                # One whole step through the engine creates its fp32 master partitions' Adam state
                # (DeepSpeed steps the optimizer it was given, now holding those partitions), then
                # all but the last micro-batch of the next step fill its gradient partitions.
                for _ in range(accum):
                    rt.forward_backward(batch, 1.0 / accum)
                rt.optimizer_step()
                for _ in range(accum - 1):
                    rt.forward_backward(batch, 1.0 / accum)
            else:
                rt.forward_backward(batch, 1.0 / accum)
                for opt in optimizers:
                    opt.step()
                if accum == 1:
                    for opt in optimizers:
                        opt.zero_grad(set_to_none=True)
            tracker.track_external(*rt.model_parts, *optimizers)
            if cfg.parallel.engine == "deepspeed":  # its fp32 master partitions, made before tracking
                tracker.track_external(*[p for opt in optimizers for g in opt.param_groups for p in g["params"]])
            with tracker:
                rt.forward_backward(batch, 1.0 / accum)
                rt.optimizer_step()
            peak = tracker.get_tracker_snapshot("peak")
    finally:
        torch.nn.functional.linear = linear
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if not peak:
        raise KilnError("--measure: the memory tracker recorded nothing")
    dev, snap = max(peak.items(), key=lambda kv: kv[1].get("Total", 0))
    out = {name: 0.0 for name in CATEGORIES.values()}
    for key, value in snap.items():
        name = getattr(key, "name", str(key))
        if name in CATEGORIES:
            out[CATEGORIES[name]] += float(value)
    out["total"] = float(snap.get("Total", sum(out.values())))
    if not out["master"]:  # only DeepSpeed keeps a separate fp32 master copy
        del out["master"]
    return out
