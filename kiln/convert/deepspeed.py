"""DeepSpeed engine checkpoints (ZeRO 0-3) -> kiln names, via DeepSpeed's own consolidator.

`get_fp32_state_dict_from_zero_checkpoint` merges the ZeRO partitions into full fp32 tensors
(the whole model in memory once). It reads files with `weights_only=False`, so first every
file must pass torch's weights-only unpickler with only four DeepSpeed classes allowed (its
loss scaler, ZeRO stage enum and fragment address): a planted file with any other global
is refused before DeepSpeed opens it.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Optional

import torch

from kiln.convert.names import check_shape, kiln_shapes
from kiln.config import Config, from_yaml_text
from kiln.checkpoint.safe_load import screen_deepspeed_file
from kiln.errors import KilnError

_STATES_GLOB = "*model_states.pt"


def _has_states(path: Path) -> bool:
    return path.is_dir() and any(path.glob(_STATES_GLOB))


def _tag_dir(path: Path) -> Optional[tuple[Path, str]]:
    """(checkpoint_dir, tag) for a tag dir, a dir with DeepSpeed's `latest`, or a kiln run dir."""
    if _has_states(path):
        return path.parent, path.name
    for base in (path, path / "checkpoints"):
        latest = base / "latest"
        if latest.is_file():
            tag = latest.read_text(errors="replace").strip()
            if Path(tag).name == tag and tag not in (".", "..") and _has_states(base / tag):
                return base, tag
    return None


def is_deepspeed_dir(path: Path) -> bool:
    return _tag_dir(Path(path)) is not None


class DeepSpeedSource:
    def __init__(self, path: Path):
        self.path = Path(path)
        found = _tag_dir(self.path)
        if found is None:
            raise KilnError(f"{self.path}: not a DeepSpeed checkpoint")
        ckpt_dir, tag = found
        tag_dir = ckpt_dir / tag
        self.cfg = self._find_config(ckpt_dir, tag_dir)
        for f in sorted(tag_dir.glob("*.pt")):
            screen_deepspeed_file(f)
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints progress; keep --json clean
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        self.state = {k.removeprefix("module."): v for k, v in state.items()}
        self.shapes = kiln_shapes(self.cfg.model)

    @staticmethod
    def _find_config(ckpt_dir: Path, tag_dir: Path) -> Config:
        for candidate in (tag_dir / "config.yaml", ckpt_dir / "config.yaml", ckpt_dir.parent / "config.yaml"):
            if candidate.is_file():
                return from_yaml_text(candidate.read_text())
        raise KilnError(f"{tag_dir}: no kiln config.yaml next to the DeepSpeed checkpoint")

    def get(self, name: str) -> torch.Tensor:
        key = name
        if key not in self.state and name == "output.weight" and self.cfg.model.tie_embeddings:
            key = "tok_embeddings.weight"
        if key not in self.state:
            raise KilnError(f"{self.path}: DeepSpeed checkpoint has no tensor {name}")
        return check_shape(name, self.state[key], self.shapes[name], str(self.path))
