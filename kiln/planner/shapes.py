"""Shape search: a Llama-style decoder whose exact parameter count is near a target N.

Rules (documented in docs/planning.md):
  - head_dim 64 below d_model 1024, else 128; n_heads = d/head_dim. d_model steps by 64 below
    1024, by 256 up to 4096 (even head counts), then by 1024 (head counts divisible by 8, for TP).
  - GQA with 8 KV heads once n_heads >= 16 and divisible by 8 (Llama 3), else one KV head per head.
  - SwiGLU ffn_dim a multiple of 256 (64 below d_model 1024) with ffn/d in [8/3, 4], preferring 3.5.
  - Aspect ratio d_model / n_layers in [32, 256], preferring 100 (Kaplan et al. 2020 find loss
    flat across a wide range; Llama 3 and Chinchilla 70B sit at 100-130).
  - n_layers even; a multiple of 4 from 8 layers and of 8 from 32, so pipeline stages divide it.
The exact count comes from kiln.model.count_params; a shape is admissible within `tolerance`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from kiln.config import ModelConfig
from kiln.errors import KilnError

ASPECT_RANGE = (32, 256)
ASPECT_TARGET = 100
FFN_RANGE = (8 / 3, 4.0)
FFN_TARGET = 3.5
# d_model steps by range: from 4096 on, n_heads (d/128) is a multiple of 8 so TP up to 8 divides it.
D_STEPS = ((64, 128, 1023), (256, 1024, 4095), (1024, 4096, 65536))


@dataclass
class Shape:
    model: ModelConfig
    seq_len: int
    params: int  # exact

    @property
    def head_dim(self) -> int:
        return self.model.dim_per_head

    @property
    def flops_per_token(self) -> float:
        """PaLM model FLOPs per token, 6N + 12 L H Q T (N without the input embedding lookup)."""
        from kiln.model import flops_per_token

        return flops_per_token(self.model, self.seq_len)

    @property
    def appendix_f_flops_per_token(self) -> float:
        return appendix_f_flops_per_token(self.model, self.seq_len)

    def as_dict(self) -> dict:
        m = self.model
        return {"n_layers": m.n_layers, "d_model": m.d_model, "n_heads": m.n_heads,
                "n_kv_heads": m.kv_heads, "ffn_dim": m.ffn_hidden, "vocab_size": m.vocab_size,
                "seq_len": self.seq_len, "params_exact": self.params}


def count(model: ModelConfig) -> int:
    from kiln.model import count_params

    return int(count_params(model))


def appendix_f_flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Chinchilla App. F training FLOPs per token (3 x forward), adapted to GQA (K/V projections
    are d x d_kv) and SwiGLU (three d x ffn matrices instead of two). Counts the embedding as a
    matmul and full (non-causal) attention, as the paper does."""
    s, d, v, h, L = seq_len, m.d_model, m.vocab_size, m.n_heads, m.n_layers
    d_kv = m.kv_heads * m.dim_per_head
    f = m.ffn_hidden
    layer = (2 * s * d * (d + 2 * d_kv)  # QKV projections
             + 2 * s * s * d  # attention logits QK^T
             + 3 * h * s * s  # softmax
             + 2 * s * s * d  # attention over values
             + 2 * s * d * d  # output projection
             + 2 * s * 3 * d * f)  # SwiGLU MLP
    forward = 2 * s * v * d + L * layer + 2 * s * d * v
    return 3 * forward / s


def largest_params(vocab_size: int, seq_len: int) -> int:
    """The largest model the search can build: the widest d_model at its deepest aspect ratio."""
    d = D_STEPS[-1][2]
    layers = max(n for n in range(2, 513) if _layer_ok(n) and d / n >= ASPECT_RANGE[0])
    return count(make_model(d, layers, int(FFN_RANGE[1] * d), vocab_size, seq_len, "largest"))


def _layer_ok(n_layers: int) -> bool:
    if n_layers >= 32:
        return n_layers % 8 == 0
    if n_layers >= 8:
        return n_layers % 4 == 0
    return n_layers >= 2 and n_layers % 2 == 0


def make_model(d_model: int, n_layers: int, ffn: int, vocab_size: int, seq_len: int, name: str) -> ModelConfig:
    head_dim = 64 if d_model < 1024 else 128
    n_heads = d_model // head_dim
    kv = 8 if n_heads >= 16 and n_heads % 8 == 0 else n_heads
    return ModelConfig(name=name, vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=kv, ffn_dim=ffn, max_seq_len=seq_len,
                       rope_theta=500000.0 if seq_len >= 8192 else 10000.0)


def search_shape(target_params: float, vocab_size: int, seq_len: int, tolerance: float = 0.03,
                 name: str = "planned") -> Shape:
    """The admissible shape closest to the preferred aspect and ffn ratios (ties: closest count)."""
    if target_params < 1e6:
        raise KilnError(f"target of {target_params:.3g} parameters is below the smallest shape the planner builds (1M)")
    best, best_score = None, math.inf
    for n_layers in range(2, 513):
        if not _layer_ok(n_layers):
            continue
        for step, d_lo, d_hi in D_STEPS:
            lo = max(d_lo, n_layers * ASPECT_RANGE[0])
            hi = min(d_hi, n_layers * ASPECT_RANGE[1])
            for d in range(math.ceil(lo / step) * step, hi + 1, step):
                multiple = 64 if d < 1024 else 256
                base = make_model(d, n_layers, multiple, vocab_size, seq_len, name)
                fixed = count(base) - n_layers * 3 * d * multiple  # everything except the MLP
                ideal = (target_params - fixed) / (3 * d * n_layers)
                for f in {math.floor(ideal / multiple) * multiple, math.ceil(ideal / multiple) * multiple}:
                    if not FFN_RANGE[0] * d - 1e-9 <= f <= FFN_RANGE[1] * d:
                        continue
                    n = fixed + n_layers * 3 * d * f
                    err = abs(n - target_params) / target_params
                    if err > tolerance:
                        continue
                    score = (abs(math.log(d / n_layers / ASPECT_TARGET))
                             + 0.5 * abs(math.log(f / d / FFN_TARGET)) + err)
                    if score < best_score:
                        best_score, best = score, (d, n_layers, f)
    if best is None and target_params > largest_params(vocab_size, seq_len):
        raise KilnError(f"the law asks for {target_params:.4g} parameters, more than the largest shape the planner "
                        f"builds ({largest_params(vocab_size, seq_len):.3g}: d_model {D_STEPS[-1][2]}); the budget "
                        "is too large for one model: lower it or fix --params")
    if best is None:
        raise KilnError(f"no shape within {tolerance:.0%} of {target_params:.4g} parameters with vocab "
                        f"{vocab_size}; the embeddings alone hold {2 * vocab_size * 128:.3g} parameters at d_model 128 "
                        "(try a smaller --vocab or a larger budget)")
    d, n_layers, f = best
    model = make_model(d, n_layers, f, vocab_size, seq_len, name)
    return Shape(model=model, seq_len=seq_len, params=count(model))
