"""Price a growth schedule: train a small model for D1 tokens, grow it (`kiln grow`, function
preserving) and train the large one for D2 more, against training the large model from scratch.

Each phase costs flops_per_token(model, seq_len) x tokens (the PaLM count kiln's MFU uses:
6N + 12 L H Q T) at one MFU and price; the scratch run sees D1 + D2 tokens unless told otherwise.
Whether the grown model reaches the scratch model's loss is an empirical question this does
not answer; it prices the schedule so the saving can be weighed against it.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from kiln.config import ModelConfig, _check_fields, _read_yaml, find_config
from kiln.errors import ConfigError, KilnError
from kiln.model.grow import GrowTarget, grown_config
from kiln.planner import cost as costs
from kiln.hardware import lookup


def load_model_config(path: str | Path) -> ModelConfig:
    """The `model` section of a kiln YAML (a model recipe or a full config; includes resolved)."""
    raw = _read_yaml(find_config(path))
    section = raw.get("model")
    if section is None:
        raise ConfigError(str(path), "has no model: section")
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), section))
    except Exception as exc:
        raise ConfigError(f"{path}: model", str(exc).splitlines()[0]) from None
    _check_fields(cfg, "model.")
    return cfg


def check_reachable(small: ModelConfig, large: ModelConfig) -> None:
    """Refuse a pair that `kiln grow` cannot turn into one another."""
    if small.dim_per_head != large.dim_per_head:
        raise KilnError(f"the large model's head_dim {large.dim_per_head} differs from the small one's "
                        f"{small.dim_per_head}: growth keeps head_dim (RoPE's frequencies depend on it)")
    if (small.vocab_size, small.tie_embeddings) != (large.vocab_size, large.tie_embeddings):
        raise KilnError("the two models differ in vocab_size or tie_embeddings, which growth does not change")
    grown_config(small, GrowTarget(large.d_model, large.ffn_hidden, large.n_heads, large.kv_heads, large.n_layers))


def price_growth(small: ModelConfig, large: ModelConfig, small_tokens: float, large_tokens: float, seq_len: int,
                 gpu: str, gpus: int, mfu: float | None = None, price: float | None = None,
                 scratch_tokens: float | None = None) -> dict:
    """FLOPs, GPU-hours, days and dollars of each phase, the schedule and the scratch run."""
    from kiln.model import count_params, flops_per_token

    check_reachable(small, large)
    acc = lookup(gpu)
    used_mfu = mfu or costs.default_mfu(acc).mfu
    scratch_tokens = scratch_tokens or small_tokens + large_tokens

    def phase(name: str, m: ModelConfig, tokens: float) -> dict:
        flops = flops_per_token(m, seq_len) * tokens
        run = costs.run_cost(flops, acc, gpus, used_mfu, price)
        return {"phase": name, "params": count_params(m), "tokens": tokens, "flops_per_token": flops_per_token(m, seq_len),
                "flops": flops, "gpu_hours": run.gpu_hours, "wall_days": run.wall_days, "cost_usd": run.cost_usd}

    phases = [phase("small", small, small_tokens), phase("grown", large, large_tokens)]
    total = {k: sum(p[k] for p in phases) for k in ("tokens", "flops", "gpu_hours", "wall_days", "cost_usd")}
    scratch = phase("scratch", large, scratch_tokens)
    return {"gpu": acc.name, "gpus": gpus, "mfu": used_mfu, "seq_len": seq_len, "phases": phases,
            "schedule": total, "scratch": scratch, "saving_fraction": 1 - total["flops"] / scratch["flops"]}
