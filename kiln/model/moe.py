"""Mixture-of-Experts SwiGLU feed-forward: a router in fp32, top-k gating, dropless (or capacity-
limited) expert compute, and the auxiliary losses.

Gating follows Mixtral: the softmax of the top-k router logits weights the chosen experts. The
load-balancing loss is Switch's n_experts * sum_i f_i * P_i (f_i: share of the top-k assignments
that go to expert i, P_i: mean router probability of i), computed per sequence and averaged over
sequences (DeepSeek's sequence-wise form), normalized so that perfect balance gives 1. Per
sequence, it does not depend on how a batch is cut into data-parallel shards, pipeline micro-batches
or accumulation steps. The router z-loss (ST-MoE) is the mean squared logsumexp of the logits.

The auxiliary losses reach the gradient without passing through the training loss function:
`attach_aux_loss` returns the layer output unchanged and, in backward, hands the aux loss the
gradient `aux_loss_scale` (set by the runtime to the scale it gives the main loss). That works on a
pipeline stage that never sees the loss too. The last values are kept on the module for logging.

Experts are stacked tensors (n_experts, out, in) so expert parallelism can shard dim 0; kiln.parallel
replaces the local compute's input and output with an all-to-all. No distributed code lives here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from kiln.config import ModelConfig


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an expert-parallel (DTensor) parameter; a plain tensor as is."""
    return t.to_local() if hasattr(t, "to_local") else t


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._grouped_mm needs 16-byte aligned rows and one dtype; on CUDA (and under torch.compile
    or fake tensors) it is a bf16 kernel (sm90+ on CUDA)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cuda" and (x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device)[0] < 9):
        return False
    if x.dtype != torch.bfloat16 and (torch.compiler.is_compiling() or is_fake(x)):
        return False  # its meta kernel (torch.compile, `kiln estimate --measure`) accepts bf16 only
    if x.device.type not in ("cpu", "cuda") or x.dtype != w.dtype:  # autocast does not cover it
        return False
    width = x.element_size()
    return all((n * width) % 16 == 0 for n in (w.shape[1], w.shape[2]))


class GroupedExperts(nn.Module):
    """n_experts SwiGLU experts as stacked weights: w1/w3 (E, hidden, d), w2 (E, d, hidden).
    `forward(x, counts)` takes rows sorted by expert, counts[e] rows for expert e."""

    def __init__(self, n_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden, d_model))  # gate
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden, d_model))  # up
        self.w2 = nn.Parameter(torch.empty(n_experts, d_model, hidden))  # down
        self.use_grouped_mm: bool | None = None  # None: where torch._grouped_mm works; False: the loop

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        w1, w3, w2 = _local(self.w1), _local(self.w3), _local(self.w2)
        if self.use_grouped_mm is not False and _grouped_mm_ok(x, w1) and x.shape[0] > 0:
            offs = counts.cumsum(0).to(torch.int32)
            h = F.silu(torch._grouped_mm(x, w1.transpose(-2, -1), offs=offs)) * \
                torch._grouped_mm(x, w3.transpose(-2, -1), offs=offs)
            return torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)
        outs = []
        for e, rows in enumerate(x.split(counts.tolist())):
            outs.append(F.linear(F.silu(F.linear(rows, w1[e])) * F.linear(rows, w3[e]), w2[e]))
        return torch.cat(outs) if outs else x.new_zeros(0, w2.shape[1])


class _AuxLossGrad(torch.autograd.Function):
    """Identity on `out`; in backward the aux loss receives d(total)/d(aux) = scale."""

    @staticmethod
    def forward(ctx, out, aux, scale):
        ctx.scale = scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full((), ctx.scale, dtype=torch.float32, device=grad.device), None


def attach_aux_loss(out: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
    return _AuxLossGrad.apply(out, aux, scale) if scale != 0 and aux.requires_grad else out


class MoEFeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        moe = cfg.moe
        self.n_experts, self.top_k = moe.n_experts, moe.top_k
        self.capacity_factor = moe.capacity_factor
        self.aux_loss_weight, self.z_loss_weight = moe.aux_loss_weight, moe.z_loss_weight
        self.router = nn.Linear(cfg.d_model, moe.n_experts, bias=False)
        self.experts = GroupedExperts(moe.n_experts, cfg.d_model, cfg.ffn_hidden)
        self.shared = None
        if moe.shared_experts:  # always-on experts, fused into one SwiGLU of their summed width
            from kiln.model.llama import FeedForward

            self.shared = FeedForward(cfg, hidden=moe.shared_experts * cfg.ffn_hidden)
        self.aux_loss_scale = 1.0  # d(total loss)/d(aux loss); the runtime sets its loss scale
        self.aux_loss: torch.Tensor | None = None  # weighted aux + z loss of the last forward (with graph)
        self.stats: dict[str, torch.Tensor] = {}  # the last forward's balance, z-loss and per-expert load

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (batch, seq, d) -> top-k expert ids (tokens, k), their gates (tokens, k, fp32), aux loss."""
        bsz, seq, _ = x.shape
        logits = F.linear(x.reshape(bsz * seq, -1).float(), _local(self.router.weight).float())
        top_logits, top_idx = logits.topk(self.top_k, dim=-1)
        gates = top_logits.softmax(dim=-1)
        probs = logits.softmax(dim=-1).view(bsz, seq, -1)
        chosen = F.one_hot(top_idx, self.n_experts).sum(1).view(bsz, seq, -1).float()
        share = chosen.mean(1) / self.top_k  # (batch, experts): f_i per sequence
        balance = (self.n_experts * (share * probs.mean(1)).sum(-1)).mean()
        z = logits.logsumexp(dim=-1).square().mean()
        self.stats = {"aux_loss": balance.detach(), "z_loss": z.detach(), "load": share.mean(0).detach()}
        return top_idx, gates, self.aux_loss_weight * balance + self.z_loss_weight * z

    def capacity(self, assignments: int) -> int | None:
        """Assignments one expert takes at most (None: dropless)."""
        if self.capacity_factor is None:
            return None
        return max(1, math.ceil(self.capacity_factor * assignments / self.n_experts))

    def assign(self, expert_of: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(order, counts): the assignments (indices into the flat top-k `expert_of`) grouped by
        expert in token order, and how many each expert takes; with a capacity, each expert's
        assignments past it are dropped. The one data-dependent step of the layer."""
        order = expert_of.argsort(stable=True)
        counts = torch.bincount(expert_of, minlength=self.n_experts)
        capacity = self.capacity(expert_of.numel())
        if capacity is not None:
            starts = counts.cumsum(0) - counts
            position = torch.arange(order.numel(), device=expert_of.device) - starts[expert_of[order]]
            order = order[position < capacity]
            counts = counts.clamp(max=capacity)
        return order, counts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, dim = x.shape
        flat = x.reshape(-1, dim)
        top_idx, gates, aux = self.route(x)
        order, counts = self.assign(top_idx.flatten())
        token_of = order // self.top_k
        routed = self.experts(flat[token_of], counts)
        weighted = routed * gates.flatten()[order, None].to(routed.dtype)
        out = flat.new_zeros(flat.shape).index_add(0, token_of, weighted.to(flat.dtype))
        if self.shared is not None:
            out = out + self.shared(flat)
        self.aux_loss = aux
        return attach_aux_loss(out.view(bsz, seq, dim), aux, self.aux_loss_scale)


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """Give every MoE layer's aux loss the gradient scale the caller gives its main loss."""
    for layer in moe_layers(model):
        layer.aux_loss_scale = scale


def local_moe_stats(parts: list[nn.Module]) -> torch.Tensor | None:
    """[balance, z-loss, load per expert...] summed over this rank's MoE layers (their last forward),
    or None without any; the caller averages over layers and replicas."""
    rows = [torch.cat([layer.stats["aux_loss"].reshape(1), layer.stats["z_loss"].reshape(1), layer.stats["load"]])
            for part in parts for layer in moe_layers(part) if layer.stats]
    return torch.stack(rows).sum(0).double() if rows else None
