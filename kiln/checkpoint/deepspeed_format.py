"""DeepSpeed engine checkpoints (ZeRO 0-3) -> kiln names, via DeepSpeed's own consolidator.

`get_fp32_state_dict_from_zero_checkpoint` merges the ZeRO partitions into full fp32 tensors
(the whole model in memory once). DeepSpeed pickles Python objects (its config enums,
optimizer state) into its files and reads them back with `weights_only=False`, so before
handing a directory to it we check every file with a restricted unpickler that admits only
torch, DeepSpeed and plain containers: a planted file with any other global is refused.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Optional

import torch

from kiln.checkpoint.layout import check_shape, kiln_shapes
from kiln.config import Config, from_yaml_text
from kiln.errors import KilnError

_MODEL_STATES = "mp_rank_00_model_states.pt"
_SAFE_MODULES = ("torch", "deepspeed", "collections", "numpy", "argparse", "enum", "_codecs", "copyreg",
                 "builtins")
_SAFE_BUILTINS = {"set", "frozenset", "dict", "list", "tuple", "int", "float", "bool", "str", "bytes",
                  "slice", "complex", "bytearray", "object", "getattr"}


def _tag_dir(path: Path) -> Optional[tuple[Path, str]]:
    """(checkpoint_dir, tag) for a tag dir, a dir with DeepSpeed's `latest`, or a kiln run dir."""
    if (path / _MODEL_STATES).is_file():
        return path.parent, path.name
    for base in (path, path / "checkpoints"):
        latest = base / "latest"
        if latest.is_file():
            tag = latest.read_text().strip()
            if (base / tag / _MODEL_STATES).is_file():
                return base, tag
    return None


def is_deepspeed_dir(path: Path) -> bool:
    return _tag_dir(Path(path)) is not None


class _ScreeningUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        top = module.split(".")[0]
        ok = top in _SAFE_MODULES and not (top == "builtins" and name not in _SAFE_BUILTINS)
        if not ok or name.startswith("_") and top != "torch" and module != "_codecs":
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        if top in ("torch", "deepspeed") and any(bad in module for bad in ("serialization", "hub", "utils.cpp_extension")):
            if not (module == "torch.serialization" and name == "_get_layout"):
                raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return _Placeholder

    def persistent_load(self, pid):
        return None


class _Placeholder:
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Placeholder()

    def __setstate__(self, state):
        pass


def screen(path: Path) -> None:
    """Walk the pickle inside a torch zip file without building any real object."""
    try:
        with zipfile.ZipFile(path) as zf:
            data_pkl = next(n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
            with zf.open(data_pkl) as f:
                _ScreeningUnpickler(f).load()
    except (pickle.UnpicklingError, StopIteration, zipfile.BadZipFile) as exc:
        raise KilnError(f"{path}: refusing to load DeepSpeed checkpoint file ({exc or 'not a torch zip file'})") from None


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
            screen(f)
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
