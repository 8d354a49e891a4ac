"""Time, money and energy for a run; DeepSeek's batch-size and learning-rate fits.

GPU-hours = model FLOPs / (peak x MFU). Model FLOPs use the PaLM count (6N + 12 L H Q T per
token), the same count kiln's MFU uses, so a measured MFU plugs straight back in. Energy is
GPU-hours x TDP x PUE: TDP is an upper bound on the accelerator's average draw and PUE folds
in cooling and power delivery; host CPUs and networking are not counted.
"""
from __future__ import annotations

from dataclasses import dataclass

from kiln.config import ModelConfig
from kiln.planner.hardware import Accelerator

DEFAULT_MFU = 0.40  # assumption: Llama 3 405B 38-43%, Megatron-LM 41-48% on H100 (planner.md)
DEFAULT_PUE = 1.2  # assumption: a modern data centre; hyperscalers report about 1.1


@dataclass
class Cost:
    gpu_hours: float
    wall_days: float
    cost_usd: float
    energy_kwh: float | None
    price_usd_per_hour: float
    pue: float


def run_cost(model_flops: float, acc: Accelerator, gpus: int, mfu: float, price: float | None = None,
             pue: float = DEFAULT_PUE) -> Cost:
    price = acc.price_usd_per_hour if price is None else price
    gpu_hours = model_flops / (acc.peak_flops * mfu) / 3600
    energy = gpu_hours * acc.tdp_w / 1000 * pue if acc.tdp_w else None
    return Cost(gpu_hours, gpu_hours / gpus / 24, gpu_hours * price, energy, price, pue)


def deepseek_compute(m: ModelConfig, seq_len: int, tokens: float) -> float:
    """DeepSeek's C = M D with M = 72 L d^2 + 12 L d l_seq non-embedding FLOPs per token
    (DeepSeek LLM 2024, arXiv 2401.02954, sec. 3.1)."""
    per_token = 72 * m.n_layers * m.d_model ** 2 + 12 * m.n_layers * m.d_model * seq_len
    return per_token * tokens


def deepseek_lr(compute: float) -> float:
    """eta_opt = 0.3118 C^-0.1250 (DeepSeek LLM, eq. 1)."""
    return 0.3118 * compute ** -0.1250


def deepseek_batch_tokens(compute: float) -> float:
    """B_opt = 0.2920 C^0.3271 tokens (DeepSeek LLM, eq. 1)."""
    return 0.2920 * compute ** 0.3271
