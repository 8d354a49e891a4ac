"""Independent TP oracle: kiln's tensor-parallel attention and MLP (DTensor plan) agree with
megatron-core's ColumnParallelLinear / RowParallelLinear given the same weight shards: outputs,
input gradients and each rank's weight-gradient shard (2 gloo ranks, CPU)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from test_parallel_support import make_cfg, rel_err, spawn

from kiln.distributed import shutdown

pytest.importorskip("megatron.core")


def _megatron_pair(cls, full_weight, rank, mcfg, **kw):
    """A megatron TP linear holding this rank's shard of `full_weight` (out, in)."""
    out_f, in_f = full_weight.shape
    layer = cls(in_f, out_f, config=mcfg, init_method=lambda w: None, bias=False, **kw)
    dim = 0 if cls.__name__ == "ColumnParallelLinear" else 1
    with torch.no_grad():
        layer.weight.copy_(full_weight.chunk(2, dim=dim)[rank])
    return layer


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import torch.distributed as dist
    from megatron.core import ModelParallelConfig, parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    from kiln.model.attention import attention
    from kiln.model.llama import Transformer, apply_rope
    from kiln.parallel import setup_parallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    mcfg = ModelParallelConfig(tensor_model_parallel_size=2, use_cpu_initialization=True,
                               perform_initialization=False, params_dtype=torch.float32)
    cfg = make_cfg(["parallel.tp=2", "parallel.sequence_parallel=false"])
    full = Transformer(cfg.model)
    torch.manual_seed(cfg.train.seed)
    full.init_weights()
    with torch.device("meta"):
        meta = Transformer(cfg.model)
    block = setup_parallel(cfg, meta, world, rank).model_parts[0].layers["0"]
    ref = full.layers["0"]

    torch.manual_seed(123)
    x = torch.randn(2, 16, cfg.model.d_model)
    grad_out = torch.randn_like(x)
    results = {}

    def run(fn):
        xi = x.clone().requires_grad_(True)
        y = fn(xi)
        (y * grad_out).sum().backward()
        if isinstance(y, AsyncCollectiveTensor):  # kiln's row-wise output, a pending all-reduce
            y = y.wait()
        return y.detach().clone(), xi.grad

    # MLP
    mw1 = _megatron_pair(ColumnParallelLinear, ref.feed_forward.w1.weight, rank, mcfg, gather_output=False)
    mw3 = _megatron_pair(ColumnParallelLinear, ref.feed_forward.w3.weight, rank, mcfg, gather_output=False)
    mw2 = _megatron_pair(RowParallelLinear, ref.feed_forward.w2.weight, rank, mcfg, input_is_parallel=True,
                         skip_bias_add=True)
    y_m, gx_m = run(lambda t: mw2(F.silu(mw1(t)[0]) * mw3(t)[0])[0])
    y_k, gx_k = run(block.feed_forward)
    results["mlp"] = (y_k, y_m, gx_k, gx_m)
    for name, m in (("w1", mw1), ("w3", mw3), ("w2", mw2)):
        results[f"mlp.{name}.grad"] = (getattr(block.feed_forward, name).weight.grad.to_local(), m.weight.grad)

    # Attention: megatron projections around kiln's own attention core on the local heads.
    att = ref.attention
    mq, mk, mv = (_megatron_pair(ColumnParallelLinear, w.weight, rank, mcfg, gather_output=False)
                  for w in (att.wq, att.wk, att.wv))
    mo = _megatron_pair(RowParallelLinear, att.wo.weight, rank, mcfg, input_is_parallel=True, skip_bias_add=True)
    hd = att.head_dim

    def megatron_attention(t):
        b, s, _ = t.shape
        q, k, v = (m(t)[0].view(b, s, -1, hd) for m in (mq, mk, mv))
        q, k = apply_rope(q, full.rope), apply_rope(k, full.rope)
        return mo(attention(q, k, v, "sdpa").reshape(b, s, -1))[0]

    y_m, gx_m = run(megatron_attention)
    y_k, gx_k = run(lambda t: block.attention(t, full.rope, None))
    results["attention"] = (y_k, y_m, gx_k, gx_m)
    for name, m in (("wq", mq), ("wk", mk), ("wv", mv), ("wo", mo)):
        results[f"attention.{name}.grad"] = (getattr(block.attention, name).weight.grad.to_local(), m.weight.grad)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    shutdown()  # barrier, destroy, flush, os._exit: the gloo exit-abort cure


@pytest.fixture(scope="module")
def results():
    out_dir = tempfile.mkdtemp(prefix="kiln_mcore_")
    spawn(worker, 2, out_dir)
    return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(2)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("module", ["mlp", "attention"])
def test_tp_module_matches_megatron(results, module):
    for per_rank in results:
        y_k, y_m, gx_k, gx_m = per_rank[module]
        assert rel_err(y_k, y_m) < 1e-5
        assert rel_err(gx_k, gx_m) < 1e-5
        grads = {k: v for k, v in per_rank.items() if k.startswith(module + ".")}
        assert len(grads) == (3 if module == "mlp" else 4)
        for name, (g_k, g_m) in grads.items():
            assert g_k.shape == g_m.shape, name
            assert rel_err(g_k, g_m) < 1e-5, name
