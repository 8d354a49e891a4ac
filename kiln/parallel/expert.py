"""Expert parallelism: each MoE layer's experts are sharded over the `ep` mesh dim, and tokens travel to
the rank that holds their expert and back with two all-to-alls.

`ep` borrows ranks from data parallelism (as torchtitan and Megatron do): dp_shard = expert_dp x ep.
Every rank routes its own tokens; the non-expert parameters stay FSDP-sharded over all of dp_shard
as before, the expert weights are split over ep (Shard(0) DTensors: n_experts/ep experts per rank)
and FSDP-sharded over expert_dp. An expert's gradient collects the tokens of all its ep peers through
the all-to-all's backward, so it must be divided by ep on top of FSDP's mean over expert_dp. gloo
has no pre-scaled reduction (FSDP's gradient divide factor), so the dispatch scales the gradient
at the experts' output by 1/ep and at their input by ep: the weights' gradients shrink by ep, the
tokens' gradients do not change.

The model does not change: hooks on `GroupedExperts` swap its input (rows sorted by global
expert, per-expert counts) for the rows this rank's experts receive, and its output for the rows
that go back to their owners, in their original order.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from kiln.model.moe import GroupedExperts


def _a2a(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Autograd-aware all_to_all_single (its backward sends the gradients back the same way)."""
    from torch.distributed import _functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group))


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class _Dispatch:
    """The pre/post hooks of one GroupedExperts under expert parallelism."""

    def __init__(self, ep_mesh: DeviceMesh):
        self.group = ep_mesh.get_group()
        self.size = ep_mesh.size()
        self.state = None

    def before(self, module: nn.Module, args):
        x, counts = args
        n_local = counts.numel() // self.size
        # received[s, j]: rows that rank s sends to this rank's local expert j
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts.contiguous(), group=self.group)
        received = received.view(self.size, n_local)
        send = counts.view(self.size, n_local).sum(1).tolist()
        recv = received.sum(1).tolist()
        rows = _a2a(x, recv, send, self.group)
        # Rows arrive grouped by source rank, then local expert: regroup by local expert.
        expert_of_row = torch.arange(n_local, device=x.device).repeat(self.size).repeat_interleave(received.flatten())
        order = expert_of_row.argsort(stable=True)
        self.state = (order, send, recv)
        return _ScaleGrad.apply(rows[order], float(self.size)), received.sum(0)

    def after(self, module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
        order, send, recv = self.state
        self.state = None
        back = torch.empty_like(order)
        back[order] = torch.arange(order.numel(), device=order.device)
        return _a2a(_ScaleGrad.apply(out, 1.0 / self.size)[back], send, recv, self.group)


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh, ep_tp_mesh: DeviceMesh | None = None) -> None:
    """Shard every GroupedExperts' weights over ep_mesh (dim 0) and route tokens with all-to-all.
    With tensor parallelism (ep_tp_mesh: the 2-D (ep, tp) mesh) the experts are also replicated
    over tp: every TP rank holds the same gathered tokens and exchanges them with its ep peers."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh, placements = (ep_mesh, [Shard(0)]) if ep_tp_mesh is None else (ep_tp_mesh, [Shard(0), Replicate()])
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            for name, param in list(module.named_parameters(recurse=False)):
                shard = distribute_tensor(param.data, mesh, placements)
                module.register_parameter(name, nn.Parameter(shard, requires_grad=param.requires_grad))
            hooks = _Dispatch(ep_mesh)
            module.register_forward_pre_hook(hooks.before)
            module.register_forward_hook(hooks.after)


def shard_experts(model: nn.Module, expert_dp_mesh: DeviceMesh, **fsdp_kwargs) -> None:
    """FSDP2 over expert_dp for each expert group, before the block's own fully_shard (which then
    leaves them alone)."""
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if isinstance(module, GroupedExperts):
            fully_shard(module, mesh=expert_dp_mesh, **fsdp_kwargs)
