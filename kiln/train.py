"""The training loop: step, accumulation, schedule, metrics, eval, checkpoint, resume.

Every worker runs `train(cfg)`. Rank discovery comes from kiln.distributed, the layout from
kiln.parallel (this file never touches a mesh dim itself), batches from kiln.data and
checkpoints from kiln.checkpoint, so the loop reads the same for one CPU process and for a
3-D parallel job.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from kiln.checkpoint.manager import CheckpointManager, read_meta
from kiln.checkpoint.resume import check_resume
from kiln.config import (Config, config_hash, grad_accum_steps, micro_step_tokens, run_dir_of, save_run_config,
                         to_yaml, tokens_per_step)
from kiln.data.loader import build_loader
from kiln.distributed import any_rank, detect_rank, init_process_group, parallel_dims, pick_device
from kiln.errors import KilnError
from kiln.metrics import MetricsLogger, device_peak_flops, mfu, quiet_other_ranks
from kiln.model import Transformer, flops_per_token
from kiln.optim import build_optimizer, lr_at, set_lr
from kiln.parallel.protocol import Runtime

log = logging.getLogger("kiln.train")
PREPARE_WAIT_S = 6 * 3600  # ranks > 0 wait this long for rank 0 to tokenize a missing corpus


class NonFiniteLoss(KilnError):
    pass


class NonFiniteGradient(KilnError):
    """Raised by train_step before the optimizer step; train() turns it into NonFiniteLoss with context."""


@dataclass
class StepResult:
    loss: Optional[torch.Tensor]  # this rank's mean micro-batch loss, on the device (None off the last stage)
    grad_norm: torch.Tensor  # global, before clipping, on the device


def train_step(rt: Runtime, batches: Iterator[dict], accum: int, grad_clip: float, noise=None,
               before_update: Optional[Callable[[], None]] = None) -> StepResult:
    """One optimizer step: `accum` micro-batches forward and backward, clip by the global norm, step.

    Values stay on the device: the one host sync is reading the runtime's finiteness flag, so a
    non-finite step raises NonFiniteGradient before the optimizer touches the weights. `before_update`
    sees the clipped gradients (tests compare them with a single process)."""
    losses = []
    for micro in range(accum):
        loss = rt.forward_backward(next(batches), 1.0 / accum)
        if loss is not None:
            losses.append(loss)
        if noise and micro == 0:
            noise.after_first_micro_batch(rt)
    grad_norm = rt.clip_grad_norm_(grad_clip)
    if noise:
        noise.after_step_gradient(grad_norm)
    mean_loss = torch.stack(losses).mean() if losses else None
    if not rt.all_finite(mean_loss, grad_norm):
        raise NonFiniteGradient(f"non-finite loss or gradient (grad_norm {float(grad_norm)})")
    if before_update:
        before_update()
    rt.optimizer_step()
    return StepResult(mean_loss, grad_norm)


class StopVote:
    """Every rank learns, one step late, whether any rank asked to stop: the vote's all-reduce runs in
    the background (gloo, on the CPU) while the next step computes, so it never stalls the step."""

    def __init__(self):
        self._work = self._flag = None

    def __call__(self, asked: bool) -> bool:
        if not dist.is_initialized():
            return asked
        decided = False
        if self._work is not None:
            self._work.wait()
            decided = bool(self._flag.item())
        self._flag = torch.tensor([1.0 if asked else 0.0])
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, async_op=True)
        return decided

    def close(self) -> None:
        """Finish the vote in flight (every rank has one, so this matches across ranks)."""
        if self._work is not None:
            self._work.wait()
            self._work = None


def _prepare_data(cfg: Config, rank: int) -> None:
    """Rank 0 tokenizes a missing corpus before any process group exists, so a long preparation
    cannot hit a collective timeout; the other ranks wait for its manifest (written last)."""
    if cfg.data.synthetic or cfg.data.prepare is None or not cfg.data.path:
        return
    if rank == 0:
        from kiln.data.prepare import ensure_prepared

        ensure_prepared(cfg.data)
        return
    manifest, start, next_log = Path(cfg.data.path) / "manifest.json", time.time(), 60.0
    while not manifest.is_file():
        time.sleep(1.0)
        waited = time.time() - start
        if waited > PREPARE_WAIT_S:
            raise KilnError(f"data.path: {manifest} did not appear after {waited:.0f}s; rank 0 prepares it, "
                            f"so data.path must be on a filesystem every node shares")
        if waited >= next_log:
            log.info("waiting for rank 0 to prepare %s (%.0fs)", cfg.data.path, waited)
            next_log += 60.0


def _keep_tokenizer(cfg: Config, run_dir: Path, resuming: bool) -> None:
    """The run directory keeps the tokenizer it trains with (generate and convert read it there)."""
    path = cfg.data.path or (cfg.data.mixture[0].path if cfg.data.mixture else None)
    if path and not cfg.data.synthetic:
        from kiln.data.tokenizer import keep_in_run

        keep_in_run(path, run_dir, resuming)


def train(cfg: Config) -> dict:
    """Run (or resume) training to cfg.train.steps. Returns a summary for the caller."""
    from kiln.batch_ramp import batch_ramp
    from kiln.distributed.signals import install_requeue_handler
    from kiln.parallel import setup_parallel

    info = detect_rank()
    rank = info.rank
    quiet_other_ranks(rank)
    parallel_dims(cfg, info.world_size)  # config errors before any process group exists
    run_dir = run_dir_of(cfg)
    ckpt = CheckpointManager(run_dir, keep_last=cfg.checkpoint.keep_last, async_save=cfg.checkpoint.async_save)
    if rank == 0:
        save_run_config(cfg)
        ckpt.clean_stale()  # what a killed or failed save left behind
    _prepare_data(cfg, rank)
    if rank == 0:
        _keep_tokenizer(cfg, run_dir, resuming=cfg.checkpoint.resume and ckpt.has_checkpoints())
    init_process_group(info.world_size, pick_device(cfg.train.device).type)

    with torch.device("meta"):  # setup_parallel allocates and initializes it (full or sharded)
        model = Transformer(cfg.model)
    rt = setup_parallel(cfg, model, info.world_size, rank)
    del model  # pipeline stages may share its (now sharded) parameters; keep no full-size copy alive
    resume_from = _resume_point(cfg, ckpt, rt, rank)
    rt.build_optimizers(lambda part: build_optimizer(part, cfg.optim, rt.device, distributed=info.world_size > 1))
    accum, step_tokens = grad_accum_steps(cfg, rt.dp_size), tokens_per_step(cfg, rt.dp_size)
    ramp = batch_ramp(cfg, rt.dp_size)  # None, or micro-steps per step growing with tokens consumed
    if resume_from is not None:
        check_resume(cfg, resume_from, read_meta(resume_from), step_tokens,
                     tokens_at=ramp.tokens_after if ramp else None)
    noise = None
    if cfg.train.noise_scale:
        from kiln.noise_scale import NoiseScale

        noise = NoiseScale(accum, micro_step_tokens(cfg, rt.dp_size), step_tokens, cfg.parallel.engine)
    train_loader = build_loader(cfg, "train", rt.dp_rank, rt.dp_size)
    step, tokens = _restore(ckpt, resume_from, rt, train_loader, cfg, rank) if resume_from else (0, 0)
    last_saved = step if resume_from else None  # already on disk: finishing a finished run must not rewrite it

    logger = MetricsLogger(run_dir, cfg.train.steps, step, cfg.logging.tensorboard,
                           cfg.logging.progress, cfg=cfg) if rank == 0 else None
    interval = Interval(rt, step, tokens, flops_per_token(cfg.model, cfg.data.seq_len), info.world_size)
    stop, vote, val_loader = install_requeue_handler(), StopVote(), None
    start_time, stopped_early, batches = time.time(), False, iter(train_loader)
    if rank == 0:
        print(f"run directory: {run_dir}", flush=True)

    def save(at_step: int) -> None:
        nonlocal last_saved
        if cfg.checkpoint.enabled and last_saved != at_step:
            meta = {"tokens": tokens, "config_hash": config_hash(cfg), "dp_size": rt.dp_size}
            ckpt.save(at_step, rt, meta, train_loader.state_dict(), rt.dp_rank, to_yaml(cfg))
            last_saved = at_step

    try:
        while step < cfg.train.steps:
            lr = lr_at(step, cfg.train.steps, cfg.optim)
            set_lr(rt.optimizers, lr)
            if ramp:
                accum = ramp.accum_at(tokens)
                step_tokens = accum * ramp.micro_tokens
            try:
                result = train_step(rt, batches, accum, cfg.optim.grad_clip, noise)
            except NonFiniteGradient as exc:
                raise NonFiniteLoss(f"{exc} at step {step + 1}; stopped before the optimizer step; last good "
                                    f"checkpoint: {ckpt.find_resumable() or 'none'}") from None
            step, tokens = step + 1, tokens + step_tokens
            interval.add(result)
            ckpt.poll()
            if logger:
                logger.advance()
            if step % cfg.logging.log_every == 0 or step == cfg.train.steps:
                record = interval.close(step, tokens, ckpt)  # the logging sync: one DP reduction
                moe = moe_metrics(cfg, rt)  # collective: every rank
                if logger:
                    logger.log({**record, "lr": lr, **(noise.metrics() if noise else {}), **moe})
            if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
                if val_loader is None:  # built once: shards are indexed and verified once per run
                    val_loader = _val_loader(cfg, rt)
                eval_loss = evaluate(cfg, rt, val_loader)
                if logger and eval_loss is not None:
                    logger.log({"step": step, "tokens": tokens, "eval_loss": eval_loss}, prefix="eval")
            out_of_time = cfg.train.max_time_s is not None and time.time() - start_time > cfg.train.max_time_s
            if vote(stop.requested or out_of_time):
                save(step)
                stopped_early = step < cfg.train.steps
                break
            if step % cfg.checkpoint.every == 0:
                save(step)
        vote.close()
        save(step)
        ckpt.wait()
    finally:
        if logger:
            logger.close()
    summary = {"step": step, "tokens": tokens, "run_dir": str(run_dir), "stopped_early": stopped_early,
               "requeue": stop.requeue, "seconds": time.time() - start_time}
    if rank == 0:
        print(f"done: step {step}, {tokens:,} tokens in {summary['seconds']:.1f}s; run directory: {run_dir}",
              flush=True)
    return summary


def moe_metrics(cfg: Config, rt) -> dict:
    """The MoE layers' balance loss, z-loss and per-expert load (share of the top-k assignments) from
    the last micro-batch, averaged over layers and data-parallel replicas; {} for a dense model.
    Collective: every rank calls it at the same step."""
    if cfg.model.moe is None:
        return {}
    from kiln.model.moe import local_moe_stats

    width = 2 + cfg.model.moe.n_experts
    stats = local_moe_stats(rt.model_parts)
    total = torch.zeros(width, dtype=torch.float64) if stats is None else stats.cpu()
    replicas = 1
    if dist.is_initialized():  # each layer lives on one pipeline stage, replicated world/pp times
        dist.all_reduce(total)
        replicas = dist.get_world_size() // cfg.parallel.pp
    mean = (total / (replicas * cfg.model.n_moe_layers)).tolist()
    return {"moe_aux_loss": mean[0], "moe_z_loss": mean[1], "moe_load_max": max(mean[2:]) * cfg.model.moe.n_experts,
            "moe_load": [round(x, 6) for x in mean[2:]]}


def _resume_point(cfg: Config, ckpt: CheckpointManager, rt: Runtime, rank: int) -> Optional[Path]:
    """The checkpoint to resume from, if any; else the `init_from` weights are loaded (before any
    optimizer exists: DeepSpeed copies them into its fp32 master when it is built)."""
    resume_from = ckpt.find_resumable() if cfg.checkpoint.resume else None
    if cfg.checkpoint.resume and resume_from is None and ckpt.has_checkpoints():
        raise KilnError(f"{ckpt.dir}: no checkpoint there is whole ({'; '.join(ckpt.rejected)}); move them away "
                        f"to start over, or set checkpoint.resume=false")
    if resume_from is None and cfg.checkpoint.init_from:
        from kiln.checkpoint.kiln_format import resolve_step_dir

        init_dir = resolve_step_dir(Path(cfg.checkpoint.init_from))
        ckpt.load_weights(init_dir, rt.model_parts, config_hash(cfg))
        if rank == 0:
            print(f"initialized weights from {init_dir} (weights only: the optimizer state is reset and "
                  f"training starts at step 0)", flush=True)
    return resume_from


def _restore(ckpt: CheckpointManager, path: Path, rt: Runtime, loader, cfg: Config, rank: int) -> tuple[int, int]:
    """Load a checkpoint into the runtime and the loader's position; returns (step, tokens)."""
    meta = ckpt.load(path, rt, config_hash(cfg))
    states = meta.get("data_state") or {}
    if meta.get("dp_size", rt.dp_size) == rt.dp_size and str(rt.dp_rank) in states:
        loader.load_state_dict(states[str(rt.dp_rank)])
    elif states:  # a different DP size: the loader maps the old ranks' positions onto the new ranks
        loader.load_state_dict(loader.remap_state(states, rt.dp_rank, rt.dp_size))
    if rank == 0:
        fresh = " (weights only: the optimizer state is reset)" if meta.get("model_only") else ""
        print(f"resumed from {path} at step {meta['step']}{fresh}", flush=True)
    return meta["step"], meta["tokens"]


class Interval:
    """What one metrics record says about the steps since the previous one: their mean loss (kept on the
    device and reduced over DP once, here), the last grad norm, tokens/s and MFU."""

    def __init__(self, rt: Runtime, step: int, tokens: int, flops_per_token: float, world_size: int):
        self.rt, self.flops_per_token, self.world_size = rt, flops_per_token, world_size
        self.peak = device_peak_flops(rt.device)
        self.loss_sum, self.steps, self.last = None, 0, None
        self.step, self.tokens, self.time = step, tokens, time.time()

    def add(self, result: StepResult) -> None:
        if result.loss is not None:
            loss = result.loss.detach()
            self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.steps, self.last = self.steps + 1, result

    def close(self, step: int, tokens: int, ckpt: CheckpointManager) -> dict:
        loss = float(self.rt.reduce_mean(None if self.loss_sum is None else self.loss_sum / self.steps))
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"non-finite loss {loss} in steps {self.step + 1}-{step}; last good checkpoint: "
                                f"{ckpt.find_resumable() or 'none'}")
        now = time.time()
        tps = (tokens - self.tokens) / max(now - self.time, 1e-9)
        record = {"step": step, "tokens": tokens, "loss": loss, "grad_norm": float(self.last.grad_norm),
                  "tokens_per_s": tps, "mfu": mfu(tps, self.flops_per_token, self.world_size, self.peak)}
        self.loss_sum, self.steps = None, 0
        self.step, self.tokens, self.time = step, tokens, now
        return record


def _val_loader(cfg: Config, rt):
    """The held-out loader, or False when any rank cannot build it (too small, a bad shard only that
    rank hashed): every rank must skip evaluation together, or the others hang in its collectives."""
    try:
        loader, failed = build_loader(cfg, "val", rt.dp_rank, rt.dp_size), False
    except KilnError as exc:
        log.warning("no evaluation: %s", exc)
        loader, failed = None, True
    return False if any_rank(failed) else loader


def evaluate(cfg: Config, rt, loader) -> float | None:
    """Mean loss over cfg.train.eval_steps held-out batches (the same batches every time)."""
    if not loader:
        return None
    total, count = None, 0
    for i, batch in enumerate(loader):
        if i >= cfg.train.eval_steps:
            break
        loss = rt.eval_loss(batch)
        if loss is not None:
            total, count = (loss if total is None else total + loss), count + 1
    value = float(rt.reduce_mean(None if total is None else total / count))
    return value if math.isfinite(value) else None
