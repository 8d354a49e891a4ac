"""Training metrics: metrics.jsonl, TensorBoard, experiment trackers (W&B, MLflow), a progress bar or log
lines with rate and ETA, MFU."""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import torch


# Loggers whose warnings every rank raises identically, e.g. DTensor's "While redistributing from
# (_NormPartial(2.0), _NormPartial(2.0)) to (Replicate(), Replicate()) ..." for the gradient norm on
# a 2-D mesh: one copy (rank 0's) says it all.
SAME_ON_EVERY_RANK = ("torch.distributed.tensor._redistribute",)


def quiet_other_ranks(rank: int) -> None:
    """Leave warnings that every rank repeats to rank 0; errors still print everywhere."""
    if rank != 0:
        for name in SAME_ON_EVERY_RANK:
            logging.getLogger(name).setLevel(logging.ERROR)


def device_peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of this device, or None when unknown (CPU, unlisted GPU): MFU is then n/a."""
    if device.type != "cuda":
        return None
    from kiln.hardware import peak_flops

    return peak_flops(torch.cuda.get_device_name(device))


def mfu(tokens_per_s: float, flops_per_token: float, n_devices: int, peak: float | None) -> float | None:
    """PaLM MFU: achieved model FLOP/s per device over the device's peak."""
    if not peak:
        return None
    return tokens_per_s * flops_per_token / n_devices / peak


class MetricsLogger:
    """Rank 0 only. One JSON object per logged step; TensorBoard scalars; human progress."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, tensorboard: bool, progress: bool,
                 cfg=None):
        self.path = run_dir / "metrics.jsonl"
        self.file = open(self.path, "a")
        self.total, self.start_step, self.t0 = total_steps, start_step, time.time()
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        self.trackers = []
        if cfg is not None:
            from kiln.trackers import open_trackers

            self.trackers = open_trackers(cfg, run_dir)
        self.bar = None
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, record: dict, prefix: str = "train") -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        if self.tb:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(f"{prefix}/{key}", value, step)
        for tracker in self.trackers:
            tracker.log(record, prefix)
        self.echo(self.format(record, prefix))

    def format(self, r: dict, prefix: str) -> str:
        if prefix != "train":
            return f"step {r['step']:>6} | eval loss {r['eval_loss']:.4f} | ppl {math.exp(min(r['eval_loss'], 50)):.2f}"
        done = r["step"] - self.start_step
        elapsed = time.time() - self.t0
        eta = elapsed / done * (self.total - r["step"]) if done else float("nan")
        mfu_text = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        return (f"step {r['step']:>6}/{self.total} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
                f"grad_norm {r['grad_norm']:.3f} | {r['tokens_per_s']:,.0f} tok/s | mfu {mfu_text} | "
                f"eta {_fmt_time(eta)}")

    def advance(self, steps: int = 1) -> None:
        if self.bar:
            self.bar.update(steps)

    def echo(self, text: str) -> None:
        if self.bar:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.tb:
            self.tb.close()
        for tracker in self.trackers:
            tracker.close()
        self.file.close()


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
