"""Function-preserving growth of a trained decoder (Gesmundo & Maile 2023, arXiv 2308.06103).

`grow_state(state, cfg, target)` turns the state dict of a model with shape `cfg` into one of a
larger shape whose logits are the parent's (up to float rounding), so training continues from the
parent's loss instead of from scratch. Each expansion keeps the function by zeroing the one
tensor through which new capacity reaches the residual stream, and fills the rest randomly
(init_std) so that gradients reach the new parameters:

- ffn_dim (the paper's MLP expansion): new rows of the SwiGLU gate w1 and up w3 are random, the
  matching new columns of the down projection w2 are zero.
- n_heads (head addition): new query heads get random wq rows and zero wo columns. Under GQA the
  old heads are moved so that each still reads its own key/value head (query head h reads kv head
  h // (n_heads / n_kv_heads)); new heads fill the free slots.
- n_kv_heads: a new kv head is a copy of the old kv head whose query heads it now serves, so it
  must be a multiple of the parent's. Attention with a duplicated kv head is the same attention.
- n_layers (layer addition): a new block with zero wo and zero w2 adds 0 + 0 to the residual
  stream, whatever its other weights; it is inserted before the parent's layer at each position.
- d_model (hidden dimension expansion): new embedding columns are zero, so the residual stream
  carries zeros in the new dimensions, and the new rows of every residual write (wo, w2, their
  biases) are zero so it keeps them zero. RMSNorm then divides by the RMS over d' dimensions,
  which is sqrt(d/d') times the parent's, so every norm's gain is scaled by sqrt(d/d') (as in the
  paper) and, a correction the paper's eps-free RMSNorm does not need, norm_eps by d/d':
  sqrt(ms * d/d' + eps * d/d') = sqrt(d/d') * sqrt(ms + eps), exactly the parent's denominator
  times the factor the gains undo. New input columns (wq, wk, wv, w1, w3, output) read only the
  zero dimensions and are random.

Not preservable here, refused: a smaller size for any dimension; a per-head width change (RoPE's
frequencies depend on head_dim, so the grown model keeps the parent's head_dim and states it
explicitly when d_model / n_heads no longer gives it); n_kv_heads that is not a multiple of the
parent's; a new vocabulary.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from kiln.config import ModelConfig
from kiln.errors import KilnError

# A block's tensors by role: the ones whose output goes to the residual stream (rows = d_model)
# and the ones that read the normed residual (columns = d_model).
WRITES = ("attention.wo", "feed_forward.w2")
READS = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")


@dataclass
class GrowTarget:
    """The grown shape; None keeps the parent's value. `insert_at` lists, for each new layer, the
    parent layer index it goes before (n_layers: after the last); None spreads them evenly."""

    d_model: Optional[int] = None
    ffn_dim: Optional[int] = None
    n_heads: Optional[int] = None
    n_kv_heads: Optional[int] = None
    n_layers: Optional[int] = None
    insert_at: Optional[Sequence[int]] = None


def grown_config(cfg: ModelConfig, target: GrowTarget) -> ModelConfig:
    """The child's ModelConfig, or a KilnError naming the expansion that cannot keep the function."""
    d = target.d_model or cfg.d_model
    heads = target.n_heads or cfg.n_heads
    kv = target.n_kv_heads or cfg.kv_heads  # kept: more query heads per kv head unless asked
    ffn = target.ffn_dim or cfg.ffn_hidden
    layers = target.n_layers if target.n_layers is not None else cfg.n_layers + len(target.insert_at or ())
    for flag, new, old in (("--d-model", d, cfg.d_model), ("--n-heads", heads, cfg.n_heads),
                           ("--n-kv-heads", kv, cfg.kv_heads), ("--ffn-dim", ffn, cfg.ffn_hidden),
                           ("--n-layers", layers, cfg.n_layers)):
        if new < old:
            raise KilnError(f"{flag} {new} is smaller than the parent's {old}: growth cannot remove capacity")
    if kv % cfg.kv_heads:
        raise KilnError(f"--n-kv-heads {kv} is not a multiple of the parent's {cfg.kv_heads}: each new kv head must "
                        f"copy one old kv head whose query heads it serves")
    if heads % kv:
        raise KilnError(f"--n-heads {heads} is not divisible by the key/value heads {kv}")
    if target.insert_at is not None:
        if len(target.insert_at) != layers - cfg.n_layers:
            raise KilnError(f"--insert-at names {len(target.insert_at)} positions but --n-layers {layers} adds "
                            f"{layers - cfg.n_layers} layers to the parent's {cfg.n_layers}")
        bad = [p for p in target.insert_at if not 0 <= p <= cfg.n_layers]
        if bad:
            raise KilnError(f"--insert-at {bad[0]} is outside 0..{cfg.n_layers} (the parent's layer indices; "
                            f"{cfg.n_layers} appends after the last layer)")
    if (d, heads, kv, ffn, layers) == (cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.ffn_hidden, cfg.n_layers):
        raise KilnError("nothing to grow: give a larger --d-model, --ffn-dim, --n-heads, --n-kv-heads or --n-layers")
    if getattr(cfg, "position", "rope") != "rope" and heads != cfg.n_heads:
        raise KilnError(f"--n-heads: model.position={cfg.position} gives each head a slope that depends on "
                        f"n_heads, so adding heads would change the old heads' attention; grow the other dimensions")
    head_dim = cfg.dim_per_head
    return dataclasses.replace(
        cfg, d_model=d, n_heads=heads, n_kv_heads=None if kv == heads and cfg.n_kv_heads is None else kv,
        ffn_dim=ffn, n_layers=layers, head_dim=None if d % heads == 0 and d // heads == head_dim else head_dim,
        norm_eps=cfg.norm_eps * cfg.d_model / d)


def insert_positions(n_parent: int, n_new: int) -> list[int]:
    """Default places for new layers: spread evenly through the parent's stack."""
    return [round((i + 1) * n_parent / (n_new + 1)) for i in range(n_new)]


def grow_state(state: dict[str, torch.Tensor], cfg: ModelConfig, target: GrowTarget,
               seed: int = 0) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Grow a full (unsharded) model state dict; returns the child's state and config."""
    new = grown_config(cfg, target)
    rand = _Random(seed, new.init_std)
    state = {k: v.detach().clone() for k, v in state.items()}
    if cfg.tie_embeddings:
        state.pop("output.weight", None)
    blocks = [{k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"layers.{i}.")}
              for i in range(cfg.n_layers)]
    top = {k: v for k, v in state.items() if not k.startswith("layers.")}
    if new.d_model > cfg.d_model:
        top, blocks = _widen(top, blocks, cfg.d_model, new.d_model, rand)
    if (new.n_heads, new.kv_heads) != (cfg.n_heads, cfg.kv_heads):
        blocks = [_add_heads(b, cfg, new, rand) for b in blocks]
    if new.ffn_dim > cfg.ffn_hidden:
        blocks = [_widen_ffn(b, cfg.ffn_hidden, new.ffn_dim, rand) for b in blocks]
    if new.n_layers > cfg.n_layers:
        positions = list(target.insert_at) if target.insert_at is not None else \
            insert_positions(cfg.n_layers, new.n_layers - cfg.n_layers)
        like = blocks[0]
        out = []
        for i in range(cfg.n_layers + 1):
            out += [_identity_block(like, rand) for p in positions if p == i]
            out += blocks[i:i + 1]
        blocks = out
    grown = dict(top)
    for i, b in enumerate(blocks):
        grown.update({f"layers.{i}.{k}": v for k, v in b.items()})
    if new.tie_embeddings:
        grown["output.weight"] = grown["tok_embeddings.weight"]
    return grown, new


class _Random:
    """Normal(0, std) tensors from one seeded generator, in the parent's dtype."""

    def __init__(self, seed: int, std: float):
        self.gen = torch.Generator().manual_seed(seed)
        self.std = std

    def __call__(self, shape, like: torch.Tensor) -> torch.Tensor:
        return (torch.randn(shape, generator=self.gen, dtype=torch.float32) * self.std).to(like.dtype)


def _pad(t: torch.Tensor, dim: int, size: int, fill) -> torch.Tensor:
    """Extend `t` along `dim` to `size` with zeros (fill=None) or `fill(shape, like)`."""
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    extra = torch.zeros(shape, dtype=t.dtype) if fill is None else fill(shape, t)
    return torch.cat([t, extra], dim=dim)


def _widen(top: dict, blocks: list[dict], d: int, d_new: int, rand: _Random) -> tuple[dict, list[dict]]:
    scale = math.sqrt(d / d_new)
    norm = lambda g: torch.cat([g.float() * scale, torch.full((d_new - d,), scale)]).to(g.dtype)  # noqa: E731
    top = dict(top, **{"tok_embeddings.weight": _pad(top["tok_embeddings.weight"], 1, d_new, None),
                       "norm.weight": norm(top["norm.weight"])})
    if "output.weight" in top:
        top["output.weight"] = _pad(top["output.weight"], 1, d_new, rand)
    out = []
    for b in blocks:
        b = dict(b)
        for name in ("attention_norm.weight", "ffn_norm.weight"):
            b[name] = norm(b[name])
        for name in READS:
            b[f"{name}.weight"] = _pad(b[f"{name}.weight"], 1, d_new, rand)
        for name in WRITES:
            b[f"{name}.weight"] = _pad(b[f"{name}.weight"], 0, d_new, None)
            if f"{name}.bias" in b:
                b[f"{name}.bias"] = _pad(b[f"{name}.bias"], 0, d_new, None)
        out.append(b)
    return top, out


def head_slots(old: ModelConfig, new: ModelConfig) -> tuple[list[int], list[int]]:
    """(slot of each old query head in the new layout, old kv head each new kv head copies).
    Old kv group g becomes new kv heads g*r .. g*r+r-1 (r = new_kv / old_kv); its old query heads
    take the first slots of those heads' query groups, in order."""
    r = new.kv_heads // old.kv_heads
    old_group, new_group = old.n_heads // old.kv_heads, new.n_heads // new.kv_heads
    kv_source = [j // r for j in range(new.kv_heads)]
    slots = []
    for h in range(old.n_heads):
        g, k = divmod(h, old_group)  # k-th query head of old kv group g
        slots.append(g * r * new_group + k)  # group g's new query slots are contiguous
    return slots, kv_source


def _add_heads(b: dict, old: ModelConfig, new: ModelConfig, rand: _Random) -> dict:
    hd = old.dim_per_head
    slots, kv_source = head_slots(old, new)
    b = dict(b)

    def heads_dim0(t, n_old, n_new, mapping, fill):  # (n*hd, ...) tensors indexed by head on dim 0
        parts = t.unflatten(0, (n_old, hd))
        grown = fill((n_new,) + tuple(parts.shape[1:]), t) if fill is not None else parts.new_zeros((n_new,) + parts.shape[1:])
        for src, dst in mapping:
            grown[dst] = parts[src]
        return grown.flatten(0, 1)

    q_map = list(enumerate(slots))
    kv_map = [(src, dst) for dst, src in enumerate(kv_source)]
    b["attention.wq.weight"] = heads_dim0(b["attention.wq.weight"], old.n_heads, new.n_heads, q_map, rand)
    for name in ("wk", "wv"):
        b[f"attention.{name}.weight"] = heads_dim0(b[f"attention.{name}.weight"], old.kv_heads, new.kv_heads, kv_map, None)
        if f"attention.{name}.bias" in b:
            b[f"attention.{name}.bias"] = heads_dim0(b[f"attention.{name}.bias"], old.kv_heads, new.kv_heads, kv_map, None)
    if "attention.wq.bias" in b:
        b["attention.wq.bias"] = heads_dim0(b["attention.wq.bias"], old.n_heads, new.n_heads, q_map, None)
    wo = b["attention.wo.weight"].t()  # (heads*hd, d): new heads' columns stay zero
    b["attention.wo.weight"] = heads_dim0(wo, old.n_heads, new.n_heads, q_map, None).t().contiguous()
    return b


def _widen_ffn(b: dict, f: int, f_new: int, rand: _Random) -> dict:
    b = dict(b)
    for name in ("w1", "w3"):
        b[f"feed_forward.{name}.weight"] = _pad(b[f"feed_forward.{name}.weight"], 0, f_new, rand)
        if f"feed_forward.{name}.bias" in b:
            b[f"feed_forward.{name}.bias"] = _pad(b[f"feed_forward.{name}.bias"], 0, f_new, None)
    b["feed_forward.w2.weight"] = _pad(b["feed_forward.w2.weight"], 1, f_new, None)
    return b


def _identity_block(like: dict, rand: _Random) -> dict:
    """A block that adds nothing to the residual stream: zero residual writes, the rest random."""
    block = {}
    for name, t in like.items():
        if name.endswith("norm.weight"):
            block[name] = torch.ones_like(t)
        elif name.endswith(".bias") or name.rsplit(".", 1)[0] in WRITES:
            block[name] = torch.zeros_like(t)
        else:
            block[name] = rand(t.shape, t)
    return block
