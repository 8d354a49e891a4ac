"""Shared helpers for the parallel tests: tiny config, batches, a gloo spawner, and the
single-process oracle (plain model + torch AdamW, written without kiln.parallel)."""
from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from kiln.config import load_config
from kiln.distributed import shutdown

TINY = ["model.vocab_size=128", "model.d_model=64", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2",
        "model.ffn_dim=128", "model.max_seq_len=64", "model.attention=sdpa", "data.seq_len=16",
        "train.micro_batch=4", "data.synthetic=markov", "train.device=cpu", "train.seed=7", "optim.lr=1e-3", "optim.weight_decay=0.1"]
STEPS = 3          # optimizer steps compared after the first gradient check
ACCUM = 2          # micro-batches per optimizer step (grad accumulation)
CLIP = 1.0


def make_cfg(overrides=()):
    return load_config([], TINY + list(overrides))


def batch_for(step: int, micro: int, dp_rank: int, cfg) -> dict:
    """The per-rank micro-batch: rows [dp_rank*B, (dp_rank+1)*B) of a global batch."""
    b, s = cfg.train.micro_batch, cfg.data.seq_len
    g = torch.Generator().manual_seed(1000 * step + micro)
    tokens = torch.randint(0, cfg.model.vocab_size, (64, s + 1), generator=g)
    docs = (torch.rand(64, s, generator=g) < 0.1).long().cumsum(1)  # packed documents (block-causal)
    rows, doc_ids = tokens[dp_rank * b:(dp_rank + 1) * b], docs[dp_rank * b:(dp_rank + 1) * b]
    batch = {"input": rows[:, :-1].contiguous(), "target": rows[:, 1:].contiguous(), "doc_ids": doc_ids}
    if cfg.parallel.cp > 1:  # context parallelism refuses document masks: plain causal batches
        del batch["doc_ids"]
    return batch


def global_batch(step: int, micro: int, dp: int, cfg) -> dict:
    parts = [batch_for(step, micro, r, cfg) for r in range(dp)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def make_adamw(module, cfg):
    """foreach=True on purpose: multi-tensor kernels refuse a mix of DTensors and plain tensors."""
    return torch.optim.AdamW(module.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                             eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay, foreach=True)


def reference_run(cfg, dp: int) -> dict:
    """Single process, full global batch: first-step loss and grads, then losses and weights."""
    from kiln.model.llama import Transformer
    from kiln.model.moe import moe_layers, set_aux_loss_scale

    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    torch.manual_seed(cfg.train.seed)
    model.init_weights()
    set_aux_loss_scale(model, 0.0)  # MoE: the oracle adds the aux losses to its loss itself
    opt = make_adamw(model, cfg)
    out = {"losses": []}
    for step in range(STEPS + 1):
        total = 0.0
        for micro in range(ACCUM):
            b = global_batch(step, micro, dp, cfg)
            loss = F.cross_entropy(model(b["input"], b.get("doc_ids")).flatten(0, 1), b["target"].flatten())
            aux = sum((m.aux_loss for m in moe_layers(model)), torch.zeros(()))
            ((loss + aux) / ACCUM).backward()
            total += loss.item() / ACCUM
        out["losses"].append(total)
        out.setdefault("norms", []).append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        if step == 0:  # clipped, as kiln's train_step hands them to before_update
            out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _local(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def layout_worker(rank: int, world: int, port: int, layouts: list, out_dir: str) -> None:
    """Run each (name, overrides) layout through kiln.parallel and save this rank's results."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import torch.distributed as dist

    from kiln.model.llama import Transformer
    from kiln.parallel import setup_parallel
    from kiln.train import train_step

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    for name, overrides in layouts:
        cfg = make_cfg(overrides)
        with torch.device("meta"):
            model = Transformer(cfg.model)
        rt = setup_parallel(cfg, model, world, rank)
        rt.build_optimizers(lambda m: make_adamw(m, cfg))
        res = {"losses": [], "norms": [], "dp_size": rt.dp_size}
        batches = (batch_for(step, micro, rt.dp_rank, cfg) for step in range(STEPS + 1) for micro in range(ACCUM))

        def keep_grads():
            named = [(n, p) for part in rt.model_parts for n, p in part.named_parameters()]
            res["grads"] = {n: _full(p.grad).clone() for n, p in named}
            # a rank's gradient is no larger than its shard of the parameter (after accumulation)
            res["oversized_grads"] = [n for n, p in named if _local(p.grad).numel() > _local(p).numel()]

        for step in range(STEPS + 1):
            result = train_step(rt, batches, ACCUM, CLIP, before_update=keep_grads if step == 0 else None)
            res["losses"].append(float(rt.reduce_mean(result.loss)))
            res["norms"].append(float(result.grad_norm))
        res["params"] = {n: _full(p.detach()).clone() for part in rt.model_parts for n, p in part.named_parameters()}
        torch.save(res, Path(out_dir) / f"{name}.rank{rank}.pt")
        dist.barrier()
    shutdown()  # barrier, destroy, flush, os._exit: the gloo exit-abort cure


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world: int, *args) -> None:
    import torch.multiprocessing as mp

    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(fn, args=(world, free_port(), *args), nprocs=world, join=True)


def run_layouts(world: int, layouts: list) -> dict:
    """{name: merged per-rank results}; grads/params from all ranks, which must agree."""
    out_dir = tempfile.mkdtemp(prefix="kiln_par_")
    spawn(layout_worker, world, layouts, out_dir)
    merged = {}
    for name, _ in layouts:
        ranks = [torch.load(Path(out_dir) / f"{name}.rank{r}.pt") for r in range(world)]
        res = {"losses": ranks[0]["losses"], "norms": ranks[0]["norms"], "dp_size": ranks[0]["dp_size"],
               "grads": {}, "params": {}, "per_rank_losses": [r["losses"] for r in ranks],
               "per_rank_norms": [r["norms"] for r in ranks],
               "oversized_grads": sorted({n for r in ranks for n in r["oversized_grads"]})}
        for r in ranks:
            for key in ("grads", "params"):
                for n, t in r[key].items():
                    if n in res[key]:
                        assert torch.equal(res[key][n], t), f"{name}: ranks disagree on {key} {n}"
                    res[key][n] = t
        merged[name] = res
    return merged


def assert_matches_reference(got: dict, ref: dict, tol: float, param_tol: float) -> None:
    """One layout's results (run_layouts) against the single process (reference_run): first-step
    gradients, losses and grad norms within `tol`, weights after the steps within `param_tol`, the
    same loss and norm on every rank, and no rank holding a gradient larger than its shard."""
    assert set(got["grads"]) == set(ref["grads"]), "every parameter appears once, under its plain FQN"
    assert not got["oversized_grads"], "gradients larger than the rank's shard (a replicated whole table)"
    for name, g in ref["grads"].items():
        assert got["grads"][name].shape == g.shape
        assert rel_err(got["grads"][name], g) < tol, f"grad {name}"
    for step, (a, b) in enumerate(zip(got["losses"], ref["losses"])):
        assert abs(a - b) / b < tol, f"loss at step {step}: {a} vs {b}"
    for step, (a, b) in enumerate(zip(got["norms"], ref["norms"])):
        assert abs(a - b) / b < tol, f"grad norm at step {step}: {a} vs {b}"
    assert all(r == got["losses"] for r in got["per_rank_losses"]), "the same loss on every rank"
    assert all(r == got["norms"] for r in got["per_rank_norms"]), "the same grad norm on every rank"
    for name, w in ref["params"].items():
        assert rel_err(got["params"][name], w) < param_tol, f"weight {name} after steps"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
