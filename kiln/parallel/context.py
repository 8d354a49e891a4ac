"""Context parallelism: the sequence split over the `cp` mesh dim, attention as a ring (Liu et al. 2023).

Load balance for the causal mask: the sequence is cut into 2*cp chunks and cp rank r holds chunks
r and 2cp-1-r (an early and a late one), so every rank computes the same number of (query, key)
pairs. Each rank projects q, k, v for its own tokens only; k and v then travel around the ring
(cp - 1 hops, each overlapped with the attention of the block in hand) and the partial results
are merged with the online softmax (running log-sum-exp). Backward runs the ring again: k, v and
their gradient accumulators travel together and the accumulators arrive home after cp hops. Memory
per rank is one remote k/v block in flight, never the whole sequence.

torch's own `context_parallel` (torch.distributed.tensor.experimental) only intercepts the CUDA SDPA
kernels (flash, efficient, cuDNN), so it cannot run on CPU/gloo; this ring computes each block with
plain fp32 matmuls on any device. Applied from outside (`apply_context_parallel`): RoPE gets the
global positions of the local tokens through a pre-hook on each attention module, and the model's
attention kernel is swapped through `Attention.context_parallel`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn


def chunk_ids(rank: int, cp: int) -> tuple[int, int]:
    """The two of the 2*cp sequence chunks that cp rank `rank` holds."""
    return rank, 2 * cp - 1 - rank


def local_positions(seq: int, cp: int, rank: int, device: torch.device | None = None) -> torch.Tensor:
    """Global positions (seq // cp,) of the tokens cp rank `rank` holds, in its local order."""
    c = seq // (2 * cp)
    return torch.cat([torch.arange(i * c, (i + 1) * c, device=device) for i in chunk_ids(rank, cp)])


def shard_sequence(t: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's load-balanced share of `t` along `dim` (the sequence): chunks r and 2cp-1-r."""
    chunks = t.chunk(2 * cp, dim=dim)
    return torch.cat([chunks[i] for i in chunk_ids(rank, cp)], dim=dim).contiguous()


class Ring:
    """Neighbours on the cp process group: `shift(t)` sends t to the next rank and returns a handle
    whose `wait()` gives the previous rank's t (batched send/recv, so NCCL does not deadlock)."""

    def __init__(self, group, rank: int, size: int):
        self.group, self.rank, self.size = group, rank, size
        self.next = dist.get_global_rank(group, (rank + 1) % size)
        self.prev = dist.get_global_rank(group, (rank - 1) % size)

    def shift(self, t: torch.Tensor) -> "_Pending":
        t = t.contiguous()
        buf = torch.empty_like(t)
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, t, self.next, self.group),
                                        dist.P2POp(dist.irecv, buf, self.prev, self.group)])
        return _Pending(buf, works)


class _Pending:
    def __init__(self, buf: torch.Tensor, works: list):
        self.buf, self.works = buf, works

    def wait(self) -> torch.Tensor:
        for w in self.works:
            w.wait()
        return self.buf


def _relation(q_chunk: int, k_chunk: int) -> Optional[bool]:
    """None: the query chunk sees none of the key chunk (it lies in the future); True: the same chunk
    (causal inside); False: an earlier chunk, seen entirely."""
    if k_chunk > q_chunk:
        return None
    return k_chunk == q_chunk


# Score elements one block tile may hold (128 MiB in fp32): a block of (s/2cp)^2 scores per head
# is computed in tiles of query rows, so memory stays bounded at any context length.
TILE_ELEMENTS = 2 ** 25


def _row_tiles(q: torch.Tensor, keys: int):
    """Query-row ranges whose (batch, heads, rows, keys) scores fit in TILE_ELEMENTS."""
    rows = q.shape[2]
    step = max(1, min(rows, TILE_ELEMENTS // max(1, q.shape[0] * q.shape[1] * keys)))
    return [(r, min(rows, r + step)) for r in range(0, rows, step)]


def _scores(q, k, causal: bool, scale: float, row0: int) -> torch.Tensor:
    """Scaled scores of query rows row0.. of a block against its keys; causal: key j <= row i."""
    s = (q @ k.transpose(-2, -1)) * scale
    if causal:
        rows = torch.arange(row0, row0 + q.shape[2], device=s.device)
        cols = torch.arange(k.shape[2], device=s.device)
        s = s.masked_fill(cols[None, :] > rows[:, None], float("-inf"))
    return s


def _expand(t: torch.Tensor, rep: int) -> torch.Tensor:
    """Grouped-query attention: kv head j serves query heads j*rep .. j*rep+rep-1."""
    return t if rep == 1 else t.repeat_interleave(rep, dim=1)


def _fold(t: torch.Tensor, rep: int) -> torch.Tensor:
    """The gradient of `_expand`: sum over the query heads that share a kv head."""
    return t if rep == 1 else t.unflatten(1, (-1, rep)).sum(2)


def _block_forward(q, k, v, causal: bool, scale: float):
    """Attention of query block q against one key/value block: (out, log-sum-exp), tile by tile."""
    outs, lses = [], []
    for r0, r1 in _row_tiles(q, k.shape[2]):
        s = _scores(q[:, :, r0:r1], k, causal, scale, r0)
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.exp(s - lse[..., None]) @ v)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _block_backward(q, k, v, dout, lse, delta, causal: bool, scale: float):
    """Gradients (dq, dk, dv) of one block, given the merged log-sum-exp and rowsum(dO * O) of the
    whole row: the probabilities are recomputed exactly as the merged softmax saw them."""
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for r0, r1 in _row_tiles(q, k.shape[2]):
        qt, dot = q[:, :, r0:r1], dout[:, :, r0:r1]
        p = torch.exp(_scores(qt, k, causal, scale, r0) - lse[:, :, r0:r1, None])
        dv += p.transpose(-2, -1) @ dot
        ds = p * (dot @ v.transpose(-2, -1) - delta[:, :, r0:r1, None])
        dq[:, :, r0:r1] = (ds @ k) * scale
        dk += (ds.transpose(-2, -1) @ qt) * scale
    return dq, dk, dv


class _RingAttention(torch.autograd.Function):
    """q (b, h, 2c, d), k and v (b, h_kv, 2c, d), all fp32 and local to this cp rank -> out like q."""

    @staticmethod
    def forward(ctx, q, k, v, ring: Ring):
        n, rank = ring.size, ring.rank
        scale, rep = 1.0 / math.sqrt(q.shape[-1]), q.shape[1] // k.shape[1]
        q_halves = q.chunk(2, dim=2)
        outs = [torch.zeros_like(h) for h in q_halves]
        lses = [torch.full(h.shape[:-1], float("-inf"), dtype=h.dtype, device=h.device) for h in q_halves]
        kv = torch.stack([k, v])
        for step in range(n):
            src = (rank - step) % n
            pending = ring.shift(kv) if step < n - 1 else None  # the next block travels while this one computes
            k_halves, v_halves = kv[0].chunk(2, dim=2), kv[1].chunk(2, dim=2)
            for a, qc in enumerate(chunk_ids(rank, n)):
                for b, kc in enumerate(chunk_ids(src, n)):
                    causal = _relation(qc, kc)
                    if causal is None:
                        continue
                    out, lse = _block_forward(q_halves[a], _expand(k_halves[b], rep), _expand(v_halves[b], rep),
                                              causal, scale)
                    merged = torch.logaddexp(lses[a], lse)  # online softmax: rescale both to the merged total
                    outs[a] = outs[a] * torch.exp(lses[a] - merged)[..., None] + out * torch.exp(lse - merged)[..., None]
                    lses[a] = merged
            if pending is not None:
                kv = pending.wait()
        out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring = ring
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        ring = ctx.ring
        n, rank = ring.size, ring.rank
        scale, rep = 1.0 / math.sqrt(q.shape[-1]), q.shape[1] // k.shape[1]
        dout = dout.contiguous()
        delta = (dout * out).sum(-1)  # rowsum(dO * O): the softmax backward's correction term
        q_h, do_h, lse_h, delta_h = (t.chunk(2, dim=2) for t in (q, dout, lse, delta))
        dq = [torch.zeros_like(h) for h in q_h]
        kv = torch.stack([k, v])
        dkv = torch.zeros_like(kv)
        c = q_h[0].shape[2]
        for step in range(n):
            src = (rank - step) % n
            pending = ring.shift(kv) if step < n - 1 else None
            for a, qc in enumerate(chunk_ids(rank, n)):
                for b, kc in enumerate(chunk_ids(src, n)):
                    causal = _relation(qc, kc)
                    if causal is None:
                        continue
                    keys = slice(b * c, (b + 1) * c)
                    dq_blk, dk, dv = _block_backward(q_h[a], _expand(kv[0, :, :, keys], rep),
                                                     _expand(kv[1, :, :, keys], rep), do_h[a], lse_h[a],
                                                     delta_h[a], causal, scale)
                    dq[a] += dq_blk
                    dkv[0, :, :, keys] += _fold(dk, rep)
                    dkv[1, :, :, keys] += _fold(dv, rep)
            if pending is not None:
                kv = pending.wait()
            # The accumulators follow their k/v block; after the last step they hop home.
            dkv = ring.shift(dkv).wait()
        return torch.cat(dq, dim=2), dkv[0], dkv[1], None


@torch.compiler.disable
def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: Ring) -> torch.Tensor:
    """Causal attention of this rank's load-balanced tokens against the whole sequence; q, k, v and
    the result in the model's (batch, seq, heads, head_dim) layout. Computed in fp32."""
    dtype = q.dtype
    q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))
    return _RingAttention.apply(q, k, v, ring).transpose(1, 2).to(dtype)


class _RingKernel:
    """What `Attention.context_parallel` calls in place of the local kernel: (q, k, v) -> out."""

    def __init__(self, ring: Ring):
        self.ring = ring

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return ring_attention(q, k, v, self.ring)


def _global_rope(cp: int, rank: int):
    """A forward pre-hook on an attention module: its RoPE table, indexed by the global positions of
    the local tokens, replaces the table the model passes (which starts at position 0)."""
    cache: dict = {}

    def hook(_module, args):
        x, rope, *rest = args
        seq = x.shape[1] * cp
        key = (seq, rope.device)
        if key not in cache:
            cache[key] = local_positions(seq, cp, rank, rope.device)
        return (x, rope[cache[key]], *rest)

    return hook


def apply_context_parallel(model: nn.Module, cp_mesh) -> None:
    """Swap every block's attention for the ring over `cp_mesh` and feed RoPE global positions.
    Applied after tensor parallelism, so the pre-hook sees the local (heads-sharded) activations."""
    ring = Ring(cp_mesh.get_group(), cp_mesh.get_local_rank(), cp_mesh.size())
    hook = _global_rope(ring.size, ring.rank)
    for block in model.layers.values():
        block.attention.context_parallel = _RingKernel(ring)
        block.attention.register_forward_pre_hook(hook)
