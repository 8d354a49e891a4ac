"""`kiln estimate`: the planner's memory and cost model applied to an existing config."""
from __future__ import annotations

from kiln.config import Config, resolve_world, tokens_per_step
from kiln.planner import cost as costs
from kiln.hardware import lookup
from kiln.planner.memory import GIB, Layout, fit_margin, fits, longest_seq_len, memory_breakdown


def layout_of(cfg: Config, gpus: int) -> Layout:
    world = resolve_world(cfg, gpus)
    p = cfg.parallel
    chunks = (p.pp_microbatches or p.pp) if p.pp > 1 else 1
    native = p.engine == "native"
    from kiln.config import grad_accum_steps

    dp = world["dp_replicate"] * world["dp_shard"]
    # FSDP shards over dp_shard x cp (context-parallel ranks reduce gradients as data ranks do).
    return Layout(grad_accum=grad_accum_steps(cfg, dp), tp=world["tp"], pp=world["pp"], dp=dp, cp=world["cp"],
                  dp_shard=world["dp_shard"] * world["cp"] if native else dp,
                  zero=3 if native else p.zero_stage,
                  micro_batch=max(1, cfg.train.micro_batch // chunks), pp_microbatches=chunks,
                  activation_checkpoint=p.activation_checkpoint, sequence_parallel=p.sequence_parallel,
                  schedule="gpipe" if p.pp_schedule == "gpipe" else "1f1b", engine=p.engine,
                  fused_optimizer=cfg.optim.fused is not False)


PLAN_MARK = "# kiln-plan-assumptions: "
# GPUs where kiln's MoE experts run as torch._grouped_mm (CUDA sm90+; kiln/model/moe.py), which
# changes what selective recompute saves (memory.moe_layer_extra_bytes); elsewhere, the expert loop.
GROUPED_MM_GPUS = {"h100", "h100-pcie", "h200", "b200"}


def plan_assumptions(paths: list[str]) -> dict:
    """The MFU, price and PUE a `kiln plan --out` file was planned with (its header comment), so
    `kiln estimate plan.yaml` costs the run the way the plan did unless flags override them."""
    import json

    for path in paths:
        try:
            with open(path) as fh:
                for line in fh:
                    if not line.startswith("#"):
                        break
                    if line.startswith(PLAN_MARK):
                        data = json.loads(line[len(PLAN_MARK):])
                        return {k: data[k] for k in ("gpu", "mfu", "price_per_gpu_hour", "pue") if data.get(k)}
        except (OSError, ValueError):
            continue
    return {}


# How far above the measured peak the formula reads at most on the layouts checked
# (bench/planner_memory.py, docs/planning.md): 33% (TP x PP, short sequences), 23% (ZeRO-3 at 8B widths).
HIGHEST_RATIO = 1.33


def memory_caveat(total: float, usable: float, margin: float) -> str | None:
    """Say when the formula alone should not refuse a layout: its total with the margin is over the
    usable memory by less than the most it was seen to read above a measured step."""
    with_margin = total * margin
    if usable < with_margin <= usable * HIGHEST_RATIO:
        return (f"the formula with its {margin - 1:.0%} margin is {with_margin / usable:.0%} of usable memory "
                f"and reads up to {HIGHEST_RATIO - 1:.0%} above a measured step on some layouts "
                "(docs/planning.md); check with --measure")
    return None


def estimate(cfg: Config, gpu: str, gpus: int, mfu: float | None = None, price: float | None = None,
             pue: float = costs.DEFAULT_PUE, headroom: float = 0.9, mfu_note: str | None = None) -> dict:
    from kiln.model import count_params, flops_per_token

    acc = lookup(gpu)
    lay = layout_of(cfg, gpus)
    lay.grouped_experts = acc.name in GROUPED_MM_GPUS
    flash = cfg.model.attention != "math"
    mem = memory_breakdown(cfg.model, cfg.data.seq_len, lay, flash=flash)
    if cfg.parallel.engine == "deepspeed" and cfg.parallel.offload_optimizer:
        mem["total"] -= mem["optimizer"]
        mem["optimizer"] = 0.0  # offloaded to host memory
    usable = acc.memory_bytes * headroom
    margin = fit_margin(cfg.model)
    terms = {k: v for k, v in mem.items() if k != "total"}
    largest = max(terms, key=terms.get)
    per_step = tokens_per_step(cfg, lay.dp)
    tokens = cfg.train.steps * per_step
    default = costs.default_mfu(acc)
    used_mfu = mfu or default.mfu
    mfu_note = mfu_note or ("given (--mfu)" if mfu else f"default for {acc.name} from {default.source}")
    run = costs.run_cost(flops_per_token(cfg.model, cfg.data.seq_len) * tokens, acc, gpus, used_mfu, price, pue)
    return {
        "gpu": acc.name, "gpus": gpus, "params": count_params(cfg.model),
        "active_params": count_params(cfg.model, active=True), "tokens": tokens,
        "layout": {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "cp": lay.cp, "dp_shard": lay.shard, "zero": lay.zero,
                   "micro_batch": lay.micro_batch, "pp_microbatches": lay.pp_microbatches,
                   "activation_checkpoint": lay.activation_checkpoint},
        "memory_breakdown_gib": {k: v / GIB for k, v in mem.items()},
        "memory_gib_per_gpu": mem["total"] / GIB, "memory_usable_gib": usable / GIB,
        "fits": fits(mem["total"], usable, cfg.model), "fit_margin": margin,
        "largest_term": largest, "memory_caveat": memory_caveat(mem["total"], usable, margin),
        "longest_seq_len": longest_seq_len(cfg.model, lay, usable, flash=flash),
        "mfu": used_mfu, "gpu_hours": run.gpu_hours, "wall_days": run.wall_days, "cost_usd": run.cost_usd,
        "energy_kwh": run.energy_kwh,
        "mfu_source": mfu_note,
        "assumptions": {"mfu": f"MFU {used_mfu:.1%}, {mfu_note}",
                        "price": f"${run.price_usd_per_hour:.2f}/GPU-hour" + ("" if price else f" ({acc.price_note})"),
                        "power": f"TDP {acc.tdp_w} W x PUE {pue:g}" if acc.tdp_w else "energy n/a"},
    }
