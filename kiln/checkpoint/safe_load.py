"""Reading DCP checkpoints without running code from them.

A DCP directory holds two pickled things: the `.metadata` file and the non-tensor ("bytes")
items such as optimizer `param_groups`. torch unpickles both freely (`pickle.load`, and an
unrestricted torch load with weights_only off in the default load planner), so a planted checkpoint could run
code on resume, `kiln generate` or `kiln convert`. Here:

- `.metadata` is read by an unpickler that admits an exact list of (module, name) pairs, the
  classes DCP itself writes; dotted names (protocol 4 attribute paths) are refused;
- every storage entry must name a plain file inside the checkpoint directory;
- bytes items load with `torch.load(weights_only=True)`, and an item declared as bytes where the
  caller expects a tensor (a model weight) is refused.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata

from kiln.errors import KilnError

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
ALLOWED_GLOBALS = frozenset(
    [(_DCP_METADATA, name) for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                         "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                                         "_MEM_FORMAT_ENCODING")]
    + [("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
       ("torch", "Size"), ("torch.serialization", "_get_layout"),
       ("collections", "OrderedDict")]
    # Path objects (StorageMeta.checkpoint_id); Python 3.13 pickles them from pathlib._local.
    + [(module, cls) for module in ("pathlib", "pathlib._local")
       for cls in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")]
    + [("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)]
)


class MetadataUnpickler(pickle.Unpickler):
    """Admit exactly `ALLOWED_GLOBALS`: no module prefixes, no dotted attribute paths."""

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def read_dcp_metadata(directory: str | Path) -> Metadata:
    """The `.metadata` of a DCP directory, unpickled safely and checked to stay inside it."""
    path = Path(directory) / ".metadata"
    try:
        metadata = MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except OSError as exc:
        raise KilnError(f"{path}: cannot read checkpoint metadata ({exc.strerror or exc})") from None
    except Exception as exc:  # any malformed pickle: UnpicklingError, EOFError, ValueError, TypeError, ...
        raise KilnError(f"{path}: not a valid checkpoint metadata file ({type(exc).__name__}: {exc})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise KilnError(f"{path}: not a valid checkpoint metadata file (holds {type(metadata).__name__})")
    for index, info in (metadata.storage_data or {}).items():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or not rel or Path(rel).name != rel or rel in (".", ".."):
            raise KilnError(f"{path}: storage entry {getattr(index, 'fqn', index)} points outside the "
                            f"checkpoint directory ({rel!r})")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """A FileSystemReader whose `.metadata` goes through `read_dcp_metadata`."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_dcp_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, with non-tensor items unpickled by torch's weights-only unpickler."""

    def __init__(self, directory: str | Path):
        super().__init__()
        self.directory = Path(directory)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        if isinstance(self.state_dict.get(fqn), torch.Tensor):
            raise KilnError(f"{self.directory}: checkpoint stores {fqn} as pickled bytes, not as a tensor; refusing it")
        try:
            loaded = torch.load(value, weights_only=True)
        except Exception as exc:
            raise KilnError(f"{self.directory}: refusing non-tensor item {fqn} "
                            f"(weights-only load: {_first_line(exc)})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def dcp_load(state: dict, directory: str | Path) -> None:
    """`dcp.load` into `state` in place, through the safe reader and planner; errors name the directory."""
    directory = str(directory)
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(directory), planner=SafeLoadPlanner(directory),
                 no_dist=not dist.is_initialized())
    except KilnError:
        raise
    except (Exception, CheckpointException) as exc:
        cause = _root_cause(exc)
        if isinstance(cause, KilnError):
            raise cause from None
        raise KilnError(f"checkpoint {directory} cannot be loaded: {_first_line(cause)}") from None


def _root_cause(exc: BaseException) -> BaseException:
    """DCP wraps each rank's failure in a CheckpointException of (exception, traceback) pairs."""
    if isinstance(exc, CheckpointException) and exc.failures:
        inner = next(iter(exc.failures.values()))
        return _root_cause(inner[0] if isinstance(inner, tuple) else inner)
    return exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# -- DeepSpeed's own files (torch.save pickles) -------------------------------------------------
def _deepspeed_classes() -> list:
    """The few DeepSpeed classes its checkpoint files legitimately pickle."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def screen_deepspeed_file(path: Path) -> None:
    """Prove a file holds only tensors, plain data and the allowed DeepSpeed classes, by loading
    it with torch's weights-only unpickler (memory-mapped: tensors are not read)."""
    try:
        with torch.serialization.safe_globals(_deepspeed_classes()):
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise KilnError(f"{path}: refusing to load DeepSpeed checkpoint file (weights_only check: {first})") from None
