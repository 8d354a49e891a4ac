"""Read and write the model part of a kiln checkpoint without a process group.

A run directory `runs/<name>/` holds `config.yaml` and `checkpoints/step_XXXXXXXX/`, each a
torch.distributed.checkpoint (DCP) directory whose app state keeps the model's state dict under
the top-level key "model". Converters read it one layer at a time (never the whole optimizer
state, never two copies of the model) and write it through `write_kiln_checkpoint`.

Nothing pickled in the checkpoint is run: see kiln.checkpoint.safe_load.
"""
from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from kiln.checkpoint.integrity import collect_sums
from kiln.checkpoint.manager import META, check_checkpoint, find_resumable, step_dir_name
from kiln.checkpoint.safe_load import dcp_load, read_dcp_metadata
from kiln.config import Config, config_hash, from_yaml_text, to_yaml
from kiln.errors import KilnError

MODEL_KEY = "model"


@contextlib.contextmanager
def _single_process():
    """Silence DCP's reminder that no process group exists: converters run in one process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def is_kiln_checkpoint(path: Path) -> bool:
    """A run dir, its checkpoints/ dir, or one step dir (a DCP dir with `.metadata`)."""
    path = Path(path)
    return (path / ".metadata").is_file() or (path / "checkpoints").is_dir() or (path / "latest").is_file()


def resolve_step_dir(path: Path) -> Path:
    """The checkpoint to read: a step dir itself (checked whole), or under a run or checkpoints/ dir
    the one `latest` names, falling back to the newest whole one if it is damaged."""
    path = Path(path)
    if (path / ".metadata").is_file():
        if (path / META).is_file():
            check_checkpoint(path)
        return path
    ckpts = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    rejected: list[str] = []
    found = find_resumable(ckpts, rejected=rejected)
    if found is None:
        why = f": {'; '.join(rejected)}" if rejected else " (expected checkpoints/latest or step_XXXXXXXX/)"
        raise KilnError(f"{path}: no complete kiln checkpoint found{why}")
    return found


def find_config(step_dir: Path) -> Config:
    """The run config saved with the checkpoint (the step dir's copy, else the run dir's)."""
    for candidate in (step_dir / "config.yaml", step_dir.parent.parent / "config.yaml"):
        if candidate.is_file():
            return from_yaml_text(candidate.read_text())
    raise KilnError(f"{step_dir}: no config.yaml next to the checkpoint; cannot tell the model shape")


class KilnCheckpointReader:
    """Model tensors of one kiln checkpoint, by kiln parameter name, read one layer at a time."""

    def __init__(self, path: Path):
        self.step_dir = resolve_step_dir(Path(path))
        self.cfg = find_config(self.step_dir)
        metadata = read_dcp_metadata(self.step_dir)
        prefix = MODEL_KEY + "."
        self.meta: dict[str, TensorStorageMetadata] = {
            fqn[len(prefix):]: md for fqn, md in metadata.state_dict_metadata.items()
            if fqn.startswith(prefix) and isinstance(md, TensorStorageMetadata)
        }
        if not self.meta:
            raise KilnError(f"{self.step_dir}: checkpoint holds no '{MODEL_KEY}' state")
        self._cache: dict[str, torch.Tensor] = {}
        self._cached_group: Optional[str] = None

    def names(self) -> list[str]:
        return list(self.meta)

    def _md(self, name: str) -> TensorStorageMetadata:
        if name not in self.meta:
            raise KilnError(f"{self.step_dir}: checkpoint has no tensor model.{name}")
        return self.meta[name]

    @staticmethod
    def _group(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[:2]) if parts[0] == "layers" else parts[0]

    def get(self, name: str) -> torch.Tensor:
        """Load `name` (and the rest of its layer, kept until another layer is asked for)."""
        if name == "output.weight" and name not in self.meta and self.cfg.model.tie_embeddings:
            name = "tok_embeddings.weight"
        self._md(name)
        group = self._group(name)
        if group != self._cached_group:
            self._cache = {}
            wanted = {n: torch.empty(tuple(md.size), dtype=md.properties.dtype)
                      for n, md in self.meta.items() if self._group(n) == group}
            state = {MODEL_KEY: wanted}
            with _single_process():
                dcp_load(state, self.step_dir)
            self._cache, self._cached_group = state[MODEL_KEY], group
        return self._cache[name]

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.get(name)


def write_kiln_checkpoint(model_state: dict, cfg: Config, out_dir: str | Path, step: int = 0,
                          source: str = "kiln convert") -> Path:
    """Write `model_state` (kiln parameter names) as a run dir that `kiln train` can start from
    (`checkpoint.init_from=OUT_DIR`) or resume. Returns the step directory."""
    out = Path(out_dir)
    ckpts = out / "checkpoints"
    step_dir = ckpts / step_dir_name(step)
    if step_dir.exists() and any(step_dir.iterdir()):
        raise KilnError(f"{step_dir} already exists; choose an empty --out directory")
    step_dir.mkdir(parents=True, exist_ok=True)
    state = {MODEL_KEY: {k: v.detach().contiguous() for k, v in model_state.items()}}
    if cfg.model.tie_embeddings:  # one copy on disk; readers map output.weight to it
        state[MODEL_KEY].pop("output.weight", None)
    with _single_process():
        dcp.save(state, checkpoint_id=str(step_dir), no_dist=True)
    text = to_yaml(cfg)
    (step_dir / "config.yaml").write_text(text)
    (out / "config.yaml").write_text(text)
    sums = collect_sums(step_dir)
    files = {p.name: p.stat().st_size for p in sorted(step_dir.iterdir()) if p.is_file()}
    meta = {"step": step, "tokens": 0, "config_hash": config_hash(cfg), "source": source,
            "model_only": True, "files": files, "sha256": sums}
    (step_dir / META).write_text(json.dumps(meta, indent=1))
    tmp = ckpts / "latest.tmp"
    tmp.write_text(step_dir.name)
    tmp.replace(ckpts / "latest")
    return step_dir
