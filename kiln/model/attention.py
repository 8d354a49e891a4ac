"""Causal self-attention kernels behind one signature: (q, k, v) in (batch, seq, heads, head_dim).

`flash` is flash-attn's CUDA kernel; `sdpa` is torch's scaled_dot_product_attention (a flash
kernel on CPU too); `math` is the explicit softmax reference that the others are tested against.
`doc_ids` (batch, seq) restricts attention to tokens of the same document (block-causal).
`window` (Mistral's sliding window) lets query i see keys j with i - window < j <= i.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kiln.errors import KilnError

BACKENDS = ("auto", "flash", "sdpa", "math")


_FLASH: dict = {}


def flash_attn_module():
    """flash-attn's (func, varlen_func) if installed with its CUDA extension, else None. Imported once,
    lazily, into a plain dict rather than an lru_cache: torch.compile traces through lru_cache into
    the import (a graph break in every attention call) but reads a filled dict as a constant, so the
    model calls this once at construction, before anything is compiled."""
    if "module" not in _FLASH:
        try:
            import flash_attn  # noqa: F401
            from flash_attn import flash_attn_func, flash_attn_varlen_func
            _FLASH["module"] = (flash_attn_func, flash_attn_varlen_func)
        except Exception:
            _FLASH["module"] = None
    return _FLASH["module"]


def flash_usable(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and flash_attn_module() is not None


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """Pick the kernel: `auto` takes flash where it can run, else sdpa. Asking for flash where
    it cannot run is an error rather than a silent fallback."""
    if name not in BACKENDS:
        raise KilnError(f"model.attention: {name!r} is not one of {', '.join(BACKENDS)}")
    if name == "flash" and not flash_usable(device, dtype):
        why = "flash-attn is not installed (pip install kiln[gpu])" if flash_attn_module() is None else \
            f"it needs a CUDA device and fp16/bf16 activations (got {device.type}, {dtype})"
        raise KilnError(f"model.attention: flash cannot run here: {why}; use sdpa or auto")
    if name == "auto":
        return "flash" if flash_usable(device, dtype) else "sdpa"
    return name


def causal_mask(seq: int, device: torch.device, window: int | None = None) -> torch.Tensor:
    """(seq, seq) bool mask: True where query i may attend key j (j <= i, and i - j < window)."""
    pos = torch.arange(seq, device=device)
    dist = pos[:, None] - pos[None, :]
    return (dist >= 0) & (dist < window) if window is not None else dist >= 0


def block_causal_mask(doc_ids: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(batch, 1, seq, seq) bool mask: causal (and windowed) within each document."""
    causal = causal_mask(doc_ids.shape[1], doc_ids.device, window)
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (causal & same_doc)[:, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str,
              doc_ids: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """Causal attention with grouped-query support; returns (batch, seq, heads, head_dim)."""
    if window is not None and window >= q.shape[1]:
        window = None  # the window covers the whole sequence: plain causal, the fast path
    if backend == "flash":
        return _flash(q, k, v, doc_ids, window)
    if backend == "sdpa":
        return _sdpa(q, k, v, doc_ids, window)
    return _math(q, k, v, doc_ids, window)


def _sdpa(q, k, v, doc_ids, window=None):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    if doc_ids is None and window is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        mask = causal_mask(q.shape[2], q.device, window) if doc_ids is None else block_causal_mask(doc_ids, window)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return out.transpose(1, 2)


def _math(q, k, v, doc_ids, window=None):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    mask = causal_mask(q.shape[2], q.device, window) if doc_ids is None else block_causal_mask(doc_ids, window)
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v
    return out.transpose(1, 2)


def _flash(q, k, v, doc_ids, window=None):
    flash_attn_func, flash_attn_varlen_func = flash_attn_module()
    # flash-attn's window_size=(left, right) counts keys beside the query itself; -1 means unbounded.
    window_size = (-1, -1) if window is None else (window - 1, 0)
    if doc_ids is None:
        return flash_attn_func(q, k, v, causal=True, window_size=window_size)
    # Block-causal: every document becomes its own variable-length sequence.
    bsz, seq = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    flat_starts = starts.flatten().nonzero().flatten()
    cu = torch.cat([flat_starts, flat_starts.new_tensor([bsz * seq])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    out = flash_attn_varlen_func(
        q.reshape(bsz * seq, *q.shape[2:]), k.reshape(bsz * seq, *k.shape[2:]),
        v.reshape(bsz * seq, *v.shape[2:]), cu, cu, max_len, max_len, causal=True, window_size=window_size)
    return out.reshape(q.shape)
