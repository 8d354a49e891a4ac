"""Gradient noise scale measured in the training loop (`train.noise_scale: true`).

McCandlish et al. 2018, "An Empirical Model of Large-Batch Training" (arXiv 1812.06162), App. A.1:
with the squared gradient norm measured at two batch sizes B_small < B_big,

    |G|^2 ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    S     ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

are unbiased estimates of the true gradient's squared norm and of the trace of the per-example
gradient covariance; their ratio B_simple = S / |G|^2 is the critical batch size estimate. Single
steps are noisy, so (as the paper does) each is averaged with an exponential moving average before
the ratio is taken.

In kiln's loop the two batches come for free from gradient accumulation: after the first
micro-batch, the (data-parallel averaged) gradient is the small batch, micro_batch x seq x dp
tokens; after the last, the whole step's batch. That needs at least two micro-batches per step.
"""
from __future__ import annotations

import math

from kiln.errors import KilnError

EMA = 0.95  # weight of the past in the moving averages (about 20 steps of memory)


def estimate(g2_small: float, g2_big: float, b_small: float, b_big: float) -> tuple[float, float]:
    """(|G|^2, S) from squared gradient norms at two batch sizes (McCandlish et al., eq. A.2-A.3)."""
    g2 = (b_big * g2_big - b_small * g2_small) / (b_big - b_small)
    s = (g2_small - g2_big) / (1.0 / b_small - 1.0 / b_big)
    return g2, s


class NoiseScale:
    """Hooks called from the training loop; `metrics()` adds its numbers to a train record."""

    def __init__(self, accum: int, micro_tokens: int, step_tokens: int, engine: str = "native"):
        if engine != "native":
            raise KilnError("train.noise_scale: needs parallel.engine=native (DeepSpeed exposes the gradient "
                            "norm only at the accumulation boundary)")
        if accum < 2:
            raise KilnError("train.noise_scale: needs at least 2 micro-batches per step (gradient accumulation); "
                            "raise train.global_batch_tokens or lower train.micro_batch")
        self.accum, self.b_small, self.b_big = accum, float(micro_tokens), float(step_tokens)
        self.g2_small = None
        self.ema_g2 = self.ema_s = None
        self.last: dict = {}

    def after_first_micro_batch(self, rt) -> None:
        """The gradient now holds the first micro-batch's loss scaled by 1/accum: undo the scale."""
        self.g2_small = (self.accum * float(rt.clip_grad_norm_(0.0))) ** 2  # max_norm 0: measure only

    def after_step_gradient(self, grad_norm) -> None:
        """`grad_norm` is the whole step's gradient norm, before clipping (reading it syncs the device:
        the measurement's cost, paid only with train.noise_scale)."""
        grad_norm = float(grad_norm)
        if self.g2_small is None or not math.isfinite(grad_norm):
            return
        g2, s = estimate(self.g2_small, grad_norm ** 2, self.b_small, self.b_big)
        if self.ema_g2 is None:
            self.ema_g2, self.ema_s = g2, s
        else:
            self.ema_g2 = EMA * self.ema_g2 + (1 - EMA) * g2
            self.ema_s = EMA * self.ema_s + (1 - EMA) * s
        noise = self.ema_s / self.ema_g2 if self.ema_g2 > 0 else float("nan")
        self.last = {"noise_scale_tokens": noise, "noise_g2": g2, "noise_trace": s}
        self.g2_small = None

    def metrics(self) -> dict:
        return dict(self.last)
