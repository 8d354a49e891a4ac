"""Time, money and energy for a run; published batch-size and learning-rate fits.

GPU-hours = model FLOPs / (peak x MFU). Model FLOPs use the PaLM count (6N + 12 L H Q T per
token), the same count kiln's MFU uses, so a measured MFU plugs straight back in. Energy is
GPU-hours x TDP x PUE: TDP is an upper bound on the accelerator's average draw and PUE folds
in cooling and power delivery; host CPUs and networking are not counted.
"""
from __future__ import annotations

from dataclasses import dataclass

from kiln.config import ModelConfig
from kiln.hardware import Accelerator

DEFAULT_MFU = 0.40  # for accelerators without a published run below (an assumption)


@dataclass(frozen=True)
class MfuDefault:
    mfu: float
    source: str


# Default MFU per accelerator generation, each from one published large training run (PaLM's
# MFU definition). A single 40% missed these runs by -52% to +36%.
_LLAMA65B = 6 * 65.2e9 * 380 / 312e12  # Touvron et al. 2023 sec. 2.4: 380 tokens/s/GPU on 2048 A100-80GB
MFU_BY_GENERATION = {
    "volta": MfuDefault(0.213, "GPT-3 175B on V100: 21.3% (Chowdhery et al. 2022, PaLM, Table 3)"),
    "ampere": MfuDefault(round(_LLAMA65B, 3), "LLaMA 65B on 2048 A100: 380 tokens/s/GPU = 6N x 380 / 312 TFLOP/s "
                                               f"= {_LLAMA65B:.1%} (Touvron et al. 2023, sec. 2.4)"),
    "hopper": MfuDefault(0.41, "Llama 3 405B on 16,384 H100: 41% BF16 MFU (Llama Team 2024, Table 4; 38-43%)"),
    "tpu": MfuDefault(0.462, "PaLM 540B on 6144 TPU v4: 46.2% (Chowdhery et al. 2022, Table 3)"),
}
GENERATION = {"v100": "volta", "v100-16gb": "volta", "a100": "ampere", "a100-40gb": "ampere",
              "a100-pcie": "ampere", "a100-pcie-40gb": "ampere", "h100": "hopper", "h100-pcie": "hopper",
              "h200": "hopper", "tpu-v4": "tpu", "tpu-v5e": "tpu", "tpu-v5p": "tpu"}


def default_mfu(acc: Accelerator) -> MfuDefault:
    """The published-run MFU for this accelerator's generation, or the 40% assumption."""
    gen = GENERATION.get(acc.name)
    if gen is None:
        return MfuDefault(DEFAULT_MFU, f"no published large run on {acc.name} in kiln's table: 40% assumed")
    d = MFU_BY_GENERATION[gen]
    if acc.name in ("h200", "tpu-v5e", "tpu-v5p"):
        return MfuDefault(d.mfu, f"nearest published run: {d.source}")
    return d
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


def kaplan_critical_batch_tokens(kaplan_loss: float) -> float:
    """Kaplan et al. 2020 (arXiv 2001.08361) eq. 1.4: B_crit(L) = B* / L^(1/alpha_B) with
    B* = 2e8 tokens, alpha_B = 0.21; L is Kaplan's loss in nats (WebText2), from his L(N, D)."""
    return 2e8 / kaplan_loss ** (1 / 0.21)


def porian_params(m: ModelConfig, params: float) -> float:
    """Porian et al.'s N: every parameter but the input embedding (the output head counts)."""
    return params if m.tie_embeddings else max(params - m.vocab_size * m.d_model, 1.0)


def porian_lr(n: float) -> float:
    """eta* = 3.7 N^-0.36 (Porian et al. 2024, arXiv 2406.19146; fitted on 25M-110M params)."""
    return 3.7 * n ** -0.36


def porian_batch_tokens(n: float) -> float:
    """B* = 0.7576 N^0.703 tokens: their 0.00037 N^0.703 sequences of 2048 tokens."""
    return 0.7576 * n ** 0.703


HPARAM_RULES = {
    "deepseek": "DeepSeek LLM 2024 (arXiv 2401.02954) eq. 1: eta = 0.3118 C^-0.125, B = 0.2920 C^0.3271 tokens, "
                "C = (72 L d^2 + 12 L d s) D",
    "kaplan": "Kaplan et al. 2020 eq. 1.4: critical batch B = 2e8 / L^(1/0.21) tokens at Kaplan's L(N, D); "
              "peak lr from DeepSeek LLM",
    "porian": "Porian et al. 2024 (arXiv 2406.19146), as tabulated by Li et al. 2025 (Step Law, arXiv "
              "2503.04715) Table 1: eta = 3.7 N^-0.36, B = 0.7576 N^0.703 tokens, N without the input "
              "embedding; fitted on 25M-110M-parameter models at about 20 tokens/param, AdamW with tuned "
              "beta2, seq 2048",
}


def hyperparameters(rule: str, m: ModelConfig, seq_len: int, params: float, tokens: float) -> dict:
    """Peak LR and global batch (tokens) under `rule`, with every rule's LR and batch for comparison."""
    from kiln.errors import KilnError
    from kiln.planner.laws import LAWS

    if rule not in HPARAM_RULES:
        raise KilnError(f"--hparams: unknown rule {rule!r}; known: {', '.join(HPARAM_RULES)}")
    c = deepseek_compute(m, seq_len, tokens)
    non_embedding = max(params - m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2), 1.0)
    n_porian = porian_params(m, params)
    batches = {"deepseek": deepseek_batch_tokens(c),
               "kaplan": kaplan_critical_batch_tokens(LAWS["kaplan"].loss(non_embedding, tokens)),
               "porian": porian_batch_tokens(n_porian)}
    lrs = {"deepseek": deepseek_lr(c), "kaplan": deepseek_lr(c), "porian": porian_lr(n_porian)}
    return {"rule": rule, "source": HPARAM_RULES[rule], "lr": lrs[rule], "batch_tokens": batches[rule],
            "batch_tokens_by_rule": batches, "lr_by_rule": lrs, "deepseek_compute": c, "porian_params": n_porian}
