"""Which device this worker computes on."""
from __future__ import annotations

import os

import torch

from kiln.errors import ConfigError


def pick_device(name: str, rank: int = 0) -> torch.device:
    """`auto`: CUDA if present, else CPU. On CUDA each process takes its LOCAL_RANK's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device", f"cuda, but this torch ({torch.__version__}) sees no CUDA device; "
                                              "use train.device=cpu or auto")
        index = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(name)
