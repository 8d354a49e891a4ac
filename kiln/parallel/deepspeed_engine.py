"""DeepSpeed as the data-parallel engine (`parallel.engine: deepspeed`, `pip install kiln[deepspeed]`).

ZeRO stage 0-3 with optional optimizer CPU offload, DP-only layouts. The runtime has the same
interface as the native one; differences the train loop should know:
- `build_optimizers(make)` wraps `make(model)` (a torch AdamW: DeepSpeed's own Adam compiles a
  C++ op) in `deepspeed.initialize` and returns `[that torch optimizer]`, so setting
  `param_groups[i]["lr"]` keeps working; the engine steps it.
- DeepSpeed clips inside `engine.step()` (`gradient_clipping` = optim.grad_clip), so
  `clip_grad_norm_` cannot see this step's norm before the step: it returns the norm DeepSpeed
  measured at the previous optimizer step (0.0 before the first).
- Checkpoints: `save_files` / `load_files` write and read DeepSpeed's own files with
  `engine.save_checkpoint` / `load_checkpoint` (ZeRO partitions are not DTensors); `state_dict` is
  empty, so the checkpoint manager writes no DCP files for it. Its files are screened before loading.
- Recomputation (`parallel.activation_checkpoint`) and per-block compile are applied to the model
  before DeepSpeed wraps it, as `parallelize` does for the native engine.
- Initialization is always `full` (see kiln.parallel.init.init_mode): every rank materializes the whole fp32
  model and moves it to its device; ZeRO partitions it only inside `deepspeed.initialize`, so the
  model must fit on one device first (no `deepspeed.zero.Init` path; use the native engine's
  `parallel.init=sharded` for larger models).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from kiln.config import Config, grad_accum_steps
from kiln.distributed import parallel_dims, pick_device
from kiln.errors import KilnError
from kiln.model.llama import count_params
from kiln.model.moe import set_aux_loss_scale
from kiln.model.loss import cross_entropy
from kiln.parallel.init import FULL_INIT_MAX_BYTES, materialize
from kiln.parallel.parallelize import apply_activation_checkpointing, compile_enabled, mixed_precision_dtype


def deepspeed_config(cfg: Config, dp_size: int, device: torch.device) -> dict:
    p = cfg.parallel
    zero: dict = {"stage": p.zero_stage}
    if p.offload_optimizer:  # the config refuses it with zero_stage 0
        zero["offload_optimizer"] = {"device": "cpu"}
    bf16 = mixed_precision_dtype(cfg, device) == torch.bfloat16
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": grad_accum_steps(cfg, dp_size),
        "gradient_clipping": cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
    }


class DeepSpeedRuntime:
    """kiln.parallel.protocol.Runtime over a DeepSpeed engine (built by build_optimizers)."""

    engine_name = "deepspeed"

    def __init__(self, cfg: Config, model: nn.Module, device: torch.device, rank: int, world_size: int):
        self.cfg = cfg
        self.mesh = None
        self.model_parts = [model]
        self.device = device
        self.dp_rank, self.dp_size = rank, world_size
        self.is_last_stage = True
        self.engine = None
        self.optimizers: list = []

    def build_optimizers(self, make) -> list:
        import deepspeed

        optimizer = make(self.model_parts[0])
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.model_parts[0], optimizer=optimizer,
            config=deepspeed_config(self.cfg, self.dp_size, self.device))
        self.model_parts = [self.engine.module]
        self.optimizers = [optimizer]
        return self.optimizers

    def _engine(self):
        if self.engine is None:
            raise KilnError("deepspeed engine: call runtime.build_optimizers(...) before training")
        return self.engine

    def _loss(self, batch: dict) -> torch.Tensor:
        doc = batch.get("doc_ids")
        logits = self._engine()(batch["input"].to(self.device), None if doc is None else doc.to(self.device))
        return cross_entropy(logits, batch["target"].to(self.device))

    def forward_backward(self, batch: dict, loss_scale: float) -> torch.Tensor:
        engine = self._engine()
        set_aux_loss_scale(self.model_parts[0], loss_scale)  # MoE aux losses: the loss's own scale
        loss = self._loss(batch)
        engine.backward(loss * loss_scale, scale_wrt_gas=False)
        if not engine.is_gradient_accumulation_boundary():
            engine.step()  # only advances DeepSpeed's micro-step counter
        return loss.detach()

    @torch.no_grad()
    def eval_loss(self, batch: dict) -> torch.Tensor:
        return self._loss(batch)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        norm = self._engine().get_global_grad_norm()
        return torch.as_tensor(0.0 if norm is None else norm, dtype=torch.float64, device=self.device)

    def reduce_mean(self, value: torch.Tensor | None) -> torch.Tensor:
        import torch.distributed as dist

        t = value.detach().double().reshape(1)
        if dist.is_initialized():
            dist.all_reduce(t)
        return t[0] / self.dp_size

    def all_finite(self, loss: torch.Tensor | None, grad_norm: torch.Tensor) -> torch.Tensor:
        """DeepSpeed's norm is the previous step's (see the module docstring), so this step's loss decides,
        averaged over DP so that every rank agrees."""
        return torch.isfinite(self.reduce_mean(loss)) & torch.isfinite(grad_norm)

    def optimizer_step(self) -> None:
        engine = self._engine()
        if not engine.is_gradient_accumulation_boundary():
            raise KilnError("deepspeed engine: optimizer_step before the last accumulation micro-batch")
        engine.step()
        engine.zero_grad()

    # -- checkpoints: DeepSpeed's own files (see the module docstring) --------------------------
    def state_dict(self, with_optimizer: bool = True) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def save_files(self, directory: Path) -> None:
        self._engine().save_checkpoint(str(directory.parent), tag=directory.name, save_latest=False)

    def load_files(self, directory: Path, with_optimizer: bool) -> None:
        """DeepSpeed's loader unpickles freely, so every file is first proven to hold only tensors,
        plain data and DeepSpeed's few own classes (torch's weights-only unpickler)."""
        from kiln.checkpoint.safe_load import screen_deepspeed_file

        for f in sorted(Path(directory).glob("*.pt")):
            screen_deepspeed_file(f)
        load_path, _ = self._engine().load_checkpoint(str(Path(directory).parent), tag=Path(directory).name,
                                                      load_optimizer_states=with_optimizer,
                                                      load_lr_scheduler_states=False)
        if load_path is None:
            raise KilnError(f"checkpoint {directory}: DeepSpeed could not load it")


def setup_deepspeed(cfg: Config, model: nn.Module, world_size: int, rank: int) -> DeepSpeedRuntime:
    parallel_dims(cfg, world_size)
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise KilnError("parallel.engine=deepspeed needs DeepSpeed: pip install 'kiln[deepspeed]'") from None
    device = pick_device(cfg.train.device, rank)
    size = 4 * count_params(cfg.model)
    if size >= FULL_INIT_MAX_BYTES and rank == 0:
        warnings.warn(f"parallel.engine=deepspeed materializes the full fp32 model ({size / 2**30:.1f} GiB) on every "
                      "rank before ZeRO partitions it; use parallel.engine=native for models that do not fit",
                      stacklevel=2)
    materialize(model, cfg.train.seed)
    model = model.to(device)
    # Recompute and compile act on the model, whichever engine shards it (before: silently ignored).
    if cfg.parallel.activation_checkpoint != "none":
        apply_activation_checkpointing(model, cfg.parallel.activation_checkpoint)
    if compile_enabled(cfg.parallel.compile, device):
        for block in model.layers.values():
            block.compile()
    return DeepSpeedRuntime(cfg, model, device, rank, world_size)
