"""`kiln estimate --measure`: per-GPU memory measured on kiln's own training step, not a formula.

One rank of the real layout runs one real training step (forward, backward, optimizer step) of
the real model at its real size, on the CPU, with every tensor fake (torch's FakeTensorMode: shapes,
dtypes and devices, no storage), the "fake" process group standing in for the other ranks, and
torch's MemTracker attributing every allocation to parameters, gradients, optimizer state,
activations or temporaries. Nothing is allocated, so a 70B model on 8 GPUs measures in seconds to
minutes on a laptop. The result is the peak of rank 0 (the first pipeline stage, which holds the most
activations under 1F1B); caching-allocator fragmentation, CUDA context and NCCL buffers are not
included (the usable headroom covers them).
"""
from __future__ import annotations

import contextlib
import copy
import os

import torch

from kiln.config import Config, grad_accum_steps
from kiln.errors import KilnError

CATEGORIES = {"PARAM": "weights", "BUFFER": "buffers", "GRAD": "grads", "OPT": "optimizer", "ACT": "activations",
              "TEMP": "temporaries"}


@contextlib.contextmanager
def _fake_world(world_size: int):
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise KilnError("--measure: a process group already exists in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _fake_friendly_setup():
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

    torch.nn.Module.to, runtime.build_mesh = to, real_mesh
    try:
        yield
    finally:
        torch.nn.Module.to, runtime.build_mesh = original, build_mesh


def measure(cfg: Config, gpus: int) -> dict:
    """Peak bytes per category (and 'total') for rank 0 of `cfg` on `gpus` ranks."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from kiln.model import Transformer
    from kiln.optim import build_optimizer
    from kiln.distributed import parallel_dims
    from kiln.parallel import setup_parallel

    if cfg.parallel.engine != "native":
        raise KilnError("--measure: measures kiln's native engine (FSDP2/TP) only, not DeepSpeed")
    from kiln.config import resolve_world

    world = resolve_world(cfg, gpus)
    if world["tp"] > 1 and world["dp_shard"] * world["dp_replicate"] > 1:
        raise KilnError("--measure: TP combined with FSDP is not measured yet (FSDP's sharding of TP's DTensors "
                        "needs tensor values under fake tensors); measure tp or dp_shard alone")
    if cfg.parallel.cp > 1:
        raise KilnError("--measure: context parallelism (parallel.cp > 1) is not measured yet (its ring sends "
                        "and receives between ranks that a fake world does not have); use the formula")
    if cfg.parallel.pp > 1:
        raise KilnError("--measure: pipeline layouts (parallel.pp > 1) are not measured yet (the pipeline "
                        "schedule reads tensor values, which fake tensors do not have); use the formula")
    cfg = copy.deepcopy(cfg)
    cfg.train.device = "cpu"
    cfg.parallel.compile = False
    if cfg.parallel.mixed_precision == "auto":
        cfg.parallel.mixed_precision = "bf16"  # what "auto" resolves to on the GPU being estimated
    cfg.parallel.init = "full"  # fake tensors: "full" init allocates nothing; steady-state memory is the same
    parallel_dims(cfg, gpus)
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    os.environ.update({"RANK": "0", "WORLD_SIZE": str(gpus), "LOCAL_RANK": "0"})
    try:
        with _fake_world(gpus), _fake_friendly_setup(), FakeTensorMode(allow_non_fake_inputs=True):
            model = Transformer(cfg.model)  # fake parameters: shapes only
            rt = setup_parallel(cfg, model, gpus, 0)
            del model
            optimizers = rt.build_optimizers(lambda part: build_optimizer(part, cfg.optim, rt.device,
                                                                          distributed=gpus > 1))
            accum = grad_accum_steps(cfg, rt.dp_size)
            tracker = MemTracker()
            batch = {"input": torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch, cfg.data.seq_len)),
                     "target": torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch, cfg.data.seq_len))}
            # An untracked first step creates the optimizer state; the tracked step then sees the
            # steady state. With accumulation, gradients already exist while the activations of a
            # later micro-batch build up, so they are kept for the tracked backward.
            rt.forward_backward(batch, 1.0 / accum)
            for opt in optimizers:
                opt.step()
            if accum == 1:
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
            tracker.track_external(*rt.model_parts, *optimizers)
            with tracker:
                rt.forward_backward(batch, 1.0 / accum)
                rt.optimizer_step()
            peak = tracker.get_tracker_snapshot("peak")
    finally:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    per_device = {dev: snap for dev, snap in peak.items()}
    if not per_device:
        raise KilnError("--measure: the memory tracker recorded nothing")
    dev, snap = max(per_device.items(), key=lambda kv: kv[1].get("Total", 0))
    out = {name: 0.0 for name in CATEGORIES.values()}
    for key, value in snap.items():
        name = getattr(key, "name", str(key))
        if name in CATEGORIES:
            out[CATEGORIES[name]] += float(value)
    out["total"] = float(snap.get("Total", sum(out.values())))
    return out
