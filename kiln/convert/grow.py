"""`kiln grow`: read a kiln checkpoint, grow the model function-preservingly, write a new run dir.

The tensors come through `KilnCheckpointReader` (DCP via the safe loader, model state only); the
expansion itself is `kiln.model.grow`. The output is a model-only checkpoint: a run started from
it (`kiln train OUT/config.yaml`: OUT is the grown run's directory, or any run with
`checkpoint.init_from=OUT`) loads the weights and starts a fresh optimizer at step 0, because Adam's moments have the parent's shapes and no
function-preserving meaning for the new parameters.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from kiln.checkpoint.kiln_format import KilnCheckpointReader, write_kiln_checkpoint
from kiln.config import validate
from kiln.errors import ConfigError, KilnError
from kiln.model.grow import GrowTarget, grow_state
from kiln.model.llama import Transformer, count_params


def grow_checkpoint(src: str | Path, out: str | Path, target: GrowTarget, seed: int = 0) -> dict:
    """Grow the checkpoint at `src` into the run dir `out`; returns a summary."""
    out = Path(os.path.abspath(out))
    if out.exists() and any(out.iterdir()):
        raise KilnError(f"--out {out} exists and is not empty; choose a new directory")
    reader = KilnCheckpointReader(Path(src))
    parent = reader.cfg
    with torch.device("meta"):
        expected = Transformer(parent.model).state_dict()
    state = {n: reader.get(n) for n in expected}
    grown, model_cfg = grow_state(state, parent.model, target, seed=seed)
    with torch.device("meta"):
        child_expected = Transformer(model_cfg).state_dict()
    mismatch = [n for n, t in child_expected.items() if n not in grown or tuple(grown[n].shape) != tuple(t.shape)]
    if mismatch or set(grown) != set(child_expected):  # a bug here, not a user error: say which tensor
        raise RuntimeError(f"grown state does not match the grown model at {(mismatch or sorted(set(grown) ^ set(child_expected)))[0]}")
    cfg = dataclasses.replace(parent, model=model_cfg)
    # OUT is the grown run's directory: `kiln train OUT/config.yaml` starts from its step-0 checkpoint.
    cfg.train = dataclasses.replace(parent.train, run_dir=str(out.parent), name=out.name)
    cfg.checkpoint = dataclasses.replace(parent.checkpoint, init_from=None, resume=True)
    try:
        validate(cfg)
    except ConfigError as exc:  # e.g. the parent's parallel.tp no longer divides the grown heads
        if exc.key == "train.name":
            raise KilnError(f"--out {out}: its last part names the grown run (train.name) and must be a plain name "
                            f"(letters, digits, '.', '_', '-')") from None
        raise KilnError(f"the grown model does not fit the parent's run config: {exc}") from None
    step_dir = write_kiln_checkpoint(grown, cfg, out, source="kiln grow")
    return {"source": str(reader.step_dir), "out": str(out), "step_dir": str(step_dir),
            "params_before": count_params(parent.model), "params_after": count_params(model_cfg),
            "model": {k: getattr(model_cfg, k) for k in ("d_model", "ffn_dim", "n_heads", "n_kv_heads", "n_layers",
                                                          "head_dim", "norm_eps")},
            "optimizer": "reset (model-only checkpoint: a run from it starts a fresh optimizer at step 0)",
            "train_with": f"kiln train {out / 'config.yaml'}"}
