"""Batch-size ramp-up: how many accumulation micro-steps optimizer step N uses.

Large batches early in training waste tokens (the critical batch size grows as the loss falls;
McCandlish et al. 2018), so GPT-3 (Brown et al. 2020, App. B) grew its batch linearly over the first
4-12B tokens and Megatron-LM offers `--rampup-batch-size START INCREMENT SAMPLES`. kiln's version:

    train.batch_ramp_start_tokens  the global batch of the first step (a multiple of one micro-step,
                                   micro_batch x seq_len x dp tokens)
    train.batch_ramp_tokens        tokens over which the batch grows linearly to global_batch_tokens

The batch grows in whole micro-steps (each DP rank's micro-batch stays the same size, so memory is
the same as at full batch): after T tokens have been consumed a step uses

    start + floor((full - start) * T / ramp_tokens)   micro-steps, at most `full`.

It is a pure function of the tokens consumed so far, which the checkpoint records, so a resumed run
takes exactly the steps an uninterrupted one takes. The LR schedule stays a function of the step.
"""
from __future__ import annotations

from dataclasses import dataclass

from kiln.config import Config, grad_accum_steps, micro_step_tokens
from kiln.errors import ConfigError


@dataclass(frozen=True)
class BatchRamp:
    micro_tokens: int  # tokens one micro-step consumes across all DP ranks
    start: int  # micro-steps in the first optimizer step
    full: int  # micro-steps at the full global batch
    ramp_tokens: int  # tokens consumed before the batch is full

    def accum_at(self, tokens_seen: int) -> int:
        """Micro-steps of the optimizer step that begins after `tokens_seen` tokens."""
        if tokens_seen >= self.ramp_tokens:
            return self.full
        return min(self.full, self.start + (self.full - self.start) * tokens_seen // self.ramp_tokens)

    def tokens_after(self, steps: int) -> int:
        """Tokens consumed by the first `steps` optimizer steps."""
        tokens = 0
        for _ in range(steps):
            accum = self.accum_at(tokens)
            if accum == self.full:  # the rest of the steps are all full
                return tokens + (steps - _) * self.full * self.micro_tokens
            tokens += accum * self.micro_tokens
        return tokens


def batch_ramp(cfg: Config, dp_size: int) -> BatchRamp | None:
    """The ramp of `cfg` at data-parallel size `dp_size`, or None when train.batch_ramp_start_tokens is
    unset. Raises ConfigError naming the key when the ramp cannot be taken in whole micro-steps."""
    t = cfg.train
    if t.batch_ramp_start_tokens is None:
        return None
    if t.global_batch_tokens is None:
        raise ConfigError("train.batch_ramp_start_tokens", "needs train.global_batch_tokens (the batch it ramps to)")
    if t.batch_ramp_tokens is None:
        raise ConfigError("train.batch_ramp_tokens", "must be set with train.batch_ramp_start_tokens "
                          "(tokens over which the batch grows)")
    if cfg.parallel.engine == "deepspeed":
        raise ConfigError("train.batch_ramp_start_tokens", "not with parallel.engine=deepspeed (its gradient "
                          "accumulation count is fixed when the engine is built); use the native engine")
    if t.noise_scale:
        raise ConfigError("train.batch_ramp_start_tokens", "not with train.noise_scale (the estimator assumes one "
                          "batch size per step)")
    per_micro = micro_step_tokens(cfg, dp_size)
    full = grad_accum_steps(cfg, dp_size)
    start = t.batch_ramp_start_tokens
    if start % per_micro:
        raise ConfigError("train.batch_ramp_start_tokens", f"{start} is not a multiple of micro_batch*seq_len*dp "
                          f"= {per_micro}")
    if start >= t.global_batch_tokens:
        raise ConfigError("train.batch_ramp_start_tokens", f"{start} must be below train.global_batch_tokens "
                          f"= {t.global_batch_tokens} (the batch it ramps to)")
    return BatchRamp(per_micro, start // per_micro, full, t.batch_ramp_tokens)
