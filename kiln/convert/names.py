"""What every converter shares: kiln's parameter names and shapes, the RoPE row permutation,
and the `Source` interface (kiln-named tensors, fetched one at a time)."""
from __future__ import annotations

from typing import Iterator, Protocol

import torch

import dataclasses

from kiln.config import Config, ModelConfig, validate
from kiln.errors import KilnError


class Source(Protocol):
    """A checkpoint seen through kiln names: `get` returns one full, unsplit tensor."""

    cfg: Config

    def get(self, name: str) -> torch.Tensor: ...


def kiln_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every entry of `Transformer(m).state_dict()` with its shape (built on the meta device)."""
    from kiln.model.llama import Transformer

    with torch.device("meta"):
        model = Transformer(m)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def validate_model(cfg: Config) -> None:
    """Validate a config built from a foreign checkpoint: only its model has to be complete
    (the data comes with the training recipe that starts from the converted weights)."""
    data = dataclasses.replace(cfg.data, path=cfg.data.path or "(set by the training recipe)")
    validate(dataclasses.replace(cfg, data=data))


def check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...], origin: str) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(expected):
        raise KilnError(f"{origin}: tensor {name} has shape {tuple(tensor.shape)}, "
                        f"the config says {tuple(expected)}")
    return tensor


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from Meta's interleaved RoPE pairs (x0,x1),(x2,x3).. to the
    rotate-half layout (first half, second half) used by Hugging Face and Megatron-Core.
    A bias (1-D) is permuted like the rows it belongs to."""
    if w.dim() == 1:
        return interleaved_to_half(w[:, None], n_heads)[:, 0]
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `interleaved_to_half`."""
    if w.dim() == 1:
        return half_to_interleaved(w[:, None], n_heads)[:, 0]
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def iter_checked(source: Source, origin: str) -> Iterator[tuple[str, torch.Tensor]]:
    """All of the model's tensors from `source`, in state-dict order, shape-checked."""
    for name, shape in kiln_shapes(source.cfg.model).items():
        yield name, check_shape(name, source.get(name), shape, origin)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cast(t: torch.Tensor, dtype: str | None) -> torch.Tensor:
    return t if dtype in (None, "keep") else t.to(DTYPES[dtype])
