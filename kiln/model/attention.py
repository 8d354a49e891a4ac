"""Causal self-attention kernels behind one signature: (q, k, v) in (batch, seq, heads, head_dim).

`flash` is flash-attn's CUDA kernel; `sdpa` is torch's scaled_dot_product_attention (a flash
kernel on CPU too); `math` is the explicit softmax reference that the others are tested against.
`doc_ids` (batch, seq) restricts attention to tokens of the same document (block-causal).
`window` (Mistral's sliding window) lets query i see keys j with i - window < j <= i.
`alibi` (heads,) are ALiBi slopes (Press et al. 2022): score(i, j) -= slope_h * (i - j).
`pattern` is a block-sparse causal pattern (`SparsePattern`): which key blocks a query block sees.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kiln.config import ATTENTION_BACKENDS
from kiln.errors import KilnError

BACKENDS = ATTENTION_BACKENDS  # checked when the config loads; here for configs built in code


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


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype, sparse: bool = False) -> str:
    """Pick the kernel: `auto` takes flash where it can run, else sdpa. Asking for flash where
    it cannot run is an error rather than a silent fallback. flash-attn has no block-sparse
    pattern (`sparse`), so those run on sdpa's masked kernel."""
    if name not in BACKENDS:
        raise KilnError(f"model.attention: {name!r} is not one of {', '.join(BACKENDS)}")
    if name == "flash" and not flash_usable(device, dtype):
        why = "flash-attn is not installed (pip install kiln[gpu])" if flash_attn_module() is None else \
            f"it needs a CUDA device and fp16/bf16 activations (got {device.type}, {dtype})"
        raise KilnError(f"model.attention: flash cannot run here: {why}; use sdpa or auto")
    if name == "flash" and sparse:
        raise KilnError("model.attention: flash cannot run model.attention_pattern (flash-attn has no block-sparse "
                        "mask); use sdpa or auto")
    if name == "auto":
        return "flash" if flash_usable(device, dtype) and not sparse else "sdpa"
    return name


@dataclass(frozen=True)
class SparsePattern:
    """Block-sparse causal attention at the granularity of `block` tokens; query block qb sees key
    block kb <= qb when qb - kb < local (the band, its own block included) or, for `local_global`
    (Longformer/BigBird's global tokens, causal), kb < global_blocks, or, for `strided` (Sparse
    Transformer's strided pattern over blocks, LongNet-style dilation), (qb - kb) % stride == 0."""

    kind: str
    block: int
    local: int = 1
    global_blocks: int = 0
    stride: int = 1

    def allowed_blocks(self, qb: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
        dist = qb - kb
        extra = kb < self.global_blocks if self.kind == "local_global" else dist % self.stride == 0
        return (dist >= 0) & ((dist < self.local) | extra)

    def attended_pairs(self, seq: int) -> int:
        """(query, key) pairs this pattern computes over `seq` tokens (causal), counted per query block."""
        total = 0
        for qb in range((seq + self.block - 1) // self.block):
            rows = min(self.block, seq - qb * self.block)
            own = rows * (rows + 1) // 2  # the diagonal block, causal inside
            band = min(self.local - 1, qb)  # earlier blocks inside the local band
            if self.kind == "local_global":
                earlier = band + min(self.global_blocks, qb - band)  # global blocks left of the band
            else:
                earlier = band + max(0, qb // self.stride - (self.local - 1) // self.stride)
            total += own + rows * self.block * earlier
        return total


def pattern_of(cfg) -> SparsePattern | None:
    """The model config's block-sparse pattern, or None for dense attention."""
    p = getattr(cfg, "attention_pattern", None)
    if p is None or p.kind == "dense":
        return None
    return SparsePattern(p.kind, p.block, p.local_blocks, p.global_blocks, p.stride)


def attended_fraction(cfg, seq: int) -> float:
    """Share of the causal (query, key) pairs that attention computes at `seq` tokens: 1 for dense,
    less under a sliding window or a block-sparse pattern. The FLOPs count scales its attention term by it."""
    causal = seq * (seq + 1) // 2
    pattern = pattern_of(cfg)
    if pattern is not None:
        return pattern.attended_pairs(seq) / causal
    w = getattr(cfg, "attention_window", None)
    if w is None or w >= seq:
        return 1.0
    return (w * (w + 1) // 2 + (seq - w) * w) / causal


def causal_mask(seq: int, device: torch.device, window: int | None = None,
                pattern: SparsePattern | None = None) -> torch.Tensor:
    """(seq, seq) bool mask: True where query i may attend key j (j <= i, and i - j < window, and
    the block pattern allows j's block)."""
    pos = torch.arange(seq, device=device)
    dist = pos[:, None] - pos[None, :]
    mask = (dist >= 0) & (dist < window) if window is not None else dist >= 0
    if pattern is not None:
        blocks = pos // pattern.block
        mask &= pattern.allowed_blocks(blocks[:, None], blocks[None, :])
    return mask


def block_causal_mask(doc_ids: torch.Tensor, window: int | None = None,
                      pattern: SparsePattern | None = None) -> torch.Tensor:
    """(batch, 1, seq, seq) bool mask: causal (windowed, patterned) within each document."""
    causal = causal_mask(doc_ids.shape[1], doc_ids.device, window, pattern)
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (causal & same_doc)[:, None]


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al. 2022): the geometric sequence 2^(-8/n), 2^(-16/n), ...
    for n a power of two; otherwise those of the largest power of two below n, then every other
    slope of twice that many."""
    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    base = 2 ** math.floor(math.log2(n_heads))
    slopes = power_of_two(base) + power_of_two(2 * base)[0::2][:n_heads - base]
    return torch.tensor(slopes, dtype=torch.float32)


def _bias(seq: int, slopes: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(heads, seq, seq) additive ALiBi bias -slope * (i - j), fp32."""
    pos = torch.arange(seq, device=device)
    return -slopes.to(device, torch.float32)[:, None, None] * (pos[:, None] - pos[None, :]).float()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str,
              doc_ids: torch.Tensor | None = None, window: int | None = None,
              alibi: torch.Tensor | None = None, pattern: SparsePattern | None = None) -> torch.Tensor:
    """Causal attention with grouped-query support; returns (batch, seq, heads, head_dim)."""
    if window is not None and window >= q.shape[1]:
        window = None  # the window covers the whole sequence: plain causal, the fast path
    if backend == "flash":
        if pattern is not None:
            raise KilnError("model.attention=flash: flash-attn has no block-sparse pattern; use sdpa or auto")
        return _flash(q, k, v, doc_ids, window, alibi)
    if backend == "sdpa":
        return _sdpa(q, k, v, doc_ids, window, alibi, pattern)
    return _math(q, k, v, doc_ids, window, alibi, pattern)


def _mask(q, doc_ids, window, pattern):
    seq = q.shape[2]
    return causal_mask(seq, q.device, window, pattern) if doc_ids is None else block_causal_mask(doc_ids, window, pattern)


def _sdpa(q, k, v, doc_ids, window=None, alibi=None, pattern=None):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    if doc_ids is None and window is None and alibi is None and pattern is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        mask = _mask(q, doc_ids, window, pattern)
        if alibi is not None:  # a float mask: the bias where allowed, -inf elsewhere
            mask = _bias(q.shape[2], alibi, q.device).masked_fill(~mask, float("-inf")).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return out.transpose(1, 2)


def _math(q, k, v, doc_ids, window=None, alibi=None, pattern=None):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if alibi is not None:
        scores = scores.float() + _bias(q.shape[2], alibi, q.device)
    scores = scores.masked_fill(~_mask(q, doc_ids, window, pattern), float("-inf"))
    out = torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v
    return out.transpose(1, 2)


def _flash(q, k, v, doc_ids, window=None, alibi=None):
    flash_attn_func, flash_attn_varlen_func = flash_attn_module()
    # flash-attn's window_size=(left, right) counts keys beside the query itself; -1 means unbounded.
    window_size = (-1, -1) if window is None else (window - 1, 0)
    slopes = None if alibi is None else alibi.to(q.device, torch.float32)  # flash adds -slope * |i - j|
    if doc_ids is None:
        return flash_attn_func(q, k, v, causal=True, window_size=window_size, alibi_slopes=slopes)
    # Block-causal: every document becomes its own variable-length sequence.
    bsz, seq = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    flat_starts = starts.flatten().nonzero().flatten()
    cu = torch.cat([flat_starts, flat_starts.new_tensor([bsz * seq])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    out = flash_attn_varlen_func(
        q.reshape(bsz * seq, *q.shape[2:]), k.reshape(bsz * seq, *k.shape[2:]),
        v.reshape(bsz * seq, *v.shape[2:]), cu, cu, max_len, max_len, causal=True, window_size=window_size,
        alibi_slopes=slopes)
    return out.reshape(q.shape)
