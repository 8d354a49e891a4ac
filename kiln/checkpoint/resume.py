"""What a resumed run must agree on with the checkpoint it resumes: the user is told, not ignored.

A resume continues the saved run's optimizer state, data position and LR schedule. A changed
learning rate, schedule or batch silently mixes two runs; a `train.steps` below the saved step
would print "done" without training. Both are refused with one line that says what differs and
how to start fresh, unless `checkpoint.allow_changes=true` says the change is meant.
"""
from __future__ import annotations

import logging
from pathlib import Path

from kiln.config import Config, config_hash, from_yaml_text
from kiln.errors import KilnError
from kiln.optim import lr_at

log = logging.getLogger("kiln.checkpoint")
# The settings that shape the optimization trajectory (the model's shape is checked by its hash).
COMPARED = ("optim.lr", "optim.min_lr_ratio", "optim.warmup_steps", "optim.decay", "optim.wsd_decay_fraction",
            "optim.weight_decay", "optim.beta1", "optim.beta2", "optim.eps", "optim.grad_clip", "data.seq_len")
FRESH = "to start fresh use a new train.name or checkpoint.resume=false"


def _get(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def check_resume(cfg: Config, ckpt: Path, meta: dict, step_tokens: int, tokens_at=None) -> None:
    """Refuse (or, with checkpoint.allow_changes, log) a resume whose settings differ from the saved run's.
    `tokens_at(step)`, when given (a batch ramp), is the tokens the first `step` steps consume."""
    step = meta.get("step") or 0
    if cfg.train.steps < step:
        raise KilnError(f"train.steps={cfg.train.steps} is below the step of checkpoint {ckpt} ({step}); "
                        f"raise train.steps to train on, or {FRESH}")
    saved_file = Path(ckpt) / "config.yaml"
    if meta.get("model_only") or not saved_file.is_file() or meta.get("config_hash") not in (None, config_hash(cfg)):
        return  # a different model shape: loading refuses it with that, the more basic, message
    try:
        saved = from_yaml_text(saved_file.read_text())
    except Exception as exc:  # an older schema: nothing to compare against
        log.warning("cannot compare settings with %s (%s)", saved_file, exc)
        return
    changes = [f"{key} {_get(saved, key)} -> {_get(cfg, key)}" for key in COMPARED if _get(saved, key) != _get(cfg, key)]
    saved_step_tokens = meta["tokens"] // step if step and meta.get("tokens") else None
    if tokens_at is not None:
        if step and meta.get("tokens") is not None and meta["tokens"] != tokens_at(step):
            changes.append(f"tokens after step {step} {meta['tokens']} -> {tokens_at(step)} (batch ramp)")
    elif saved_step_tokens and saved_step_tokens != step_tokens:
        changes.append(f"tokens per step {saved_step_tokens} -> {step_tokens}")
    if cfg.train.steps != saved.train.steps and not changes:
        before, after = lr_at(step, saved.train.steps, saved.optim), lr_at(step, cfg.train.steps, cfg.optim)
        if abs(before - after) > 1e-9 * max(abs(before), 1e-30):  # WSD's stable phase, constant: no jump
            changes.append(f"train.steps {saved.train.steps} -> {cfg.train.steps} moves the {cfg.optim.decay} "
                           f"schedule (lr at step {step}: {before:.3g} -> {after:.3g})")
    if not changes:
        return
    what = "; ".join(changes)
    if cfg.checkpoint.allow_changes:
        log.warning("resuming %s with changed settings (checkpoint.allow_changes=true): %s", ckpt, what)
        return
    raise KilnError(f"resuming {ckpt} with different settings: {what}; keep the saved values, "
                    f"or set checkpoint.allow_changes=true to continue with the new ones, or {FRESH}")
