"""A Llama-style decoder in plain PyTorch: RMSNorm, RoPE, grouped-query attention, SwiGLU.

No distributed code lives here. Parallelism is applied from outside (kiln.parallel), which is
why the blocks sit in a ModuleDict keyed by layer index (pipeline stages delete entries and
keep stable names) and why embedding, final norm and output may be None on a pipeline stage.
Parameter names follow Meta's reference layout; RoPE uses its interleaved-pair convention.
Optional variants of real checkpoints: explicit head_dim, q/k/v/o and MLP biases, RoPE scaling
(llama3, linear, yarn) and a sliding attention window (Mistral).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import ModelConfig, RopeScalingConfig
from kiln.model.attention import (alibi_slopes, attended_fraction, attention, flash_attn_module, pattern_of,
                                  resolve_backend)
from kiln.model.moe import GroupedExperts, MoEFeedForward


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScalingConfig | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) and the attention factor that scales cos/sin. Computed in
    fp32 with the published formulas, in the same order of operations as Hugging Face transformers,
    so that converted checkpoints reproduce its logits at long range too."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq, 1.0
    factor = scaling.factor
    if scaling.type == "linear":  # positions / factor == frequencies / factor
        return inv_freq / factor, 1.0
    if scaling.type == "llama3":  # Llama 3.1: long wavelengths / factor, short kept, smooth in between
        old_len = scaling.original_max_position_embeddings
        low_wavelen, high_wavelen = old_len / scaling.low_freq_factor, old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    # YaRN (Peng et al. 2023): interpolate low frequencies, keep high ones, ramp between them.
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = scaling.attention_factor
    if attn is None:
        attn = mscale(factor, scaling.mscale) / mscale(factor, scaling.mscale_all_dim) \
            if scaling.mscale and scaling.mscale_all_dim else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(scaling.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    extrapolation = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, float(attn)


def rope_cache(head_dim: int, max_seq_len: int, theta: float, scaling: RopeScalingConfig | None = None) -> torch.Tensor:
    """(max_seq_len, head_dim/2, 2) cos/sin table for rotating interleaved pairs."""
    inv_freq, attn_factor = rope_frequencies(head_dim, theta, scaling)
    angles = torch.arange(max_seq_len, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    return torch.stack([angles.cos() * attn_factor, angles.sin() * attn_factor], dim=-1)


def model_rope_cache(cfg: ModelConfig) -> torch.Tensor:
    return rope_cache(cfg.dim_per_head, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)


def apply_rope(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x (batch, seq, heads, head_dim) by position: each pair is the
    complex number x[2i] + i x[2i+1] times cos + i sin, one complex multiply (a third fewer kernels
    and no stack copy, against the same product written out in reals)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    rotation = torch.view_as_complex(cache[: x.shape[1]].float())[:, None, :]  # the cache may be cast to bf16
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.kv_heads
        self.head_dim = cfg.dim_per_head
        self.backend = cfg.attention
        self.window = cfg.attention_window
        self.pattern = pattern_of(cfg)
        self.alibi = cfg.position == "alibi"
        # Tensor parallelism gives each rank a slice of the heads; kiln.parallel sets where it starts,
        # so each head keeps its own ALiBi slope.
        self.head_offset = 0
        # Context parallelism (kiln.parallel.context) sets a ring over the sequence shards here:
        # (q, k, v) -> out, in place of the local kernel.
        self.context_parallel = None
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        self.wq = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=qkv_bias)
        self.wk = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.wv = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=cfg.attention_bias)
        flash_attn_module()  # the import attempt happens here, eagerly, not inside a compiled forward

    def forward(self, x: torch.Tensor, rope: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        bsz, seq, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds a slice of the heads.
        q = self.wq(x).view(bsz, seq, -1, self.head_dim)
        k = self.wk(x).view(bsz, seq, -1, self.head_dim)
        v = self.wv(x).view(bsz, seq, -1, self.head_dim)
        slopes = None
        if self.alibi:
            slopes = alibi_slopes(self.n_heads)[self.head_offset:self.head_offset + q.shape[2]]
        else:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if self.context_parallel is not None:
            out = self.context_parallel(q, k, v)
        else:
            backend = resolve_backend(self.backend, q.device, q.dtype, sparse=self.pattern is not None)
            out = attention(q, k, v, backend, doc_ids, self.window, slopes, self.pattern)
        return self.wo(out.reshape(bsz, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig, hidden: int | None = None):
        super().__init__()
        hidden = hidden or cfg.ffn_hidden
        self.w1 = nn.Linear(cfg.d_model, hidden, bias=cfg.mlp_bias)  # gate
        self.w3 = nn.Linear(cfg.d_model, hidden, bias=cfg.mlp_bias)  # up
        self.w2 = nn.Linear(hidden, cfg.d_model, bias=cfg.mlp_bias)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = MoEFeedForward(cfg) if cfg.is_moe_layer(layer) else FeedForward(cfg)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope, doc_ids)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("rope", model_rope_cache(cfg), persistent=False)
        self.init_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the output. Called again by `init_weights` because
        `to_empty()` (meta -> device) gives each module a new Parameter and so unties them."""
        if self.cfg.tie_embeddings and self.output is not None and self.tok_embeddings is not None:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) everywhere; residual-output projections scaled by 1/sqrt(2L)
        (GPT-2) so the residual stream's variance does not grow with depth. Biases start at zero."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        self.tie_weights()
        self.rope.copy_(model_rope_cache(self.cfg).to(self.rope.device))
        for name, module in self.named_modules():
            if isinstance(module, RMSNorm):
                module.reset_parameters()
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                is_out = name.endswith(("attention.wo", "feed_forward.w2", "feed_forward.shared.w2"))
                nn.init.normal_(module.weight, mean=0.0, std=out_std if is_out else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, GroupedExperts):
                nn.init.normal_(module.w1, mean=0.0, std=std)
                nn.init.normal_(module.w3, mean=0.0, std=std)
                nn.init.normal_(module.w2, mean=0.0, std=out_std)

    def forward(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (batch, seq) int64 -> logits (batch, seq, vocab). On a pipeline stage without
        the embedding, `tokens` is the previous stage's hidden state; without the output, the
        hidden state is returned."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for layer in self.layers.values():
            h = layer(h, self.rope, doc_ids)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h


def count_params(cfg: ModelConfig, active: bool = False) -> int:
    """Exact parameter count from the shape: embedding and output tables (one if tied), the blocks, the
    final norm. Every expert counts; `active=True` counts only those one token uses (top_k + shared)."""
    blocks = sum(cfg.layer_params(i, active) for i in range(cfg.n_layers))
    return cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2) + blocks + cfg.d_model


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """PaLM model FLOPs per trained token: 6N + 12 L H Q T (Chowdhery et al. 2022, App. B).
    N excludes the input embedding table, which is a lookup, not a matmul. Under a sliding window
    or a block-sparse pattern the attention term is scaled by the share of causal (query, key)
    pairs computed (`attended_fraction`). A MoE model counts its active parameters: the top_k routed
    and the shared experts a token passes through, and the router."""
    n = count_params(cfg, active=True) - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
    return 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.dim_per_head * seq_len * attended_fraction(cfg, seq_len)
