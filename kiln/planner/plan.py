"""From a budget to a plan: law -> (N, D) -> exact shape -> layout -> cost -> kiln config."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from kiln.errors import KilnError
from kiln.planner import cost as costs
from kiln.hardware import Accelerator, lookup
from kiln.planner.laws import (DEFAULT_LAW, MUENNIGHOFF, ParametricLaw, get_law, inference_optimum,
                               inference_optimum_at_loss)
from kiln.planner.layout import DEFAULT_HEADROOM, GPUS_PER_NODE, choose_layout
from kiln.planner.memory import GIB
from kiln.planner.shapes import Shape, search_shape

DEFAULT_VOCAB = 32000
EVALS_PER_RUN = 50  # a plan's config evaluates ~50 times and at the last step, whatever its length
CHECKPOINTS_PER_RUN = 20
MAX_AUTO_DAYS = 30.0

# Bounds that catch typos (a missing exponent, an extra zero), not ambition.
BOUNDS = {
    "flops": (1e15, 1e30), "gpus": (1, 1_000_000), "days": (1e-3, 3650), "budget_usd": (1, 1e12),
    "params": (1e6, 1e14), "tokens": (1e6, 1e16), "mfu": (1e-3, 0.99), "price_per_gpu_hour": (1e-3, 1000),
    "inference_tokens": (0, 1e20), "vocab": (2, 10_000_000), "seq_len": (16, 1 << 20), "pue": (1.0, 3.0),
    "headroom": (0.1, 1.0), "max_days": (1e-3, 3650), "unique_tokens": (1e6, 1e16), "target_loss": (0.01, 20),
}
SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12, "p": 1e15}


def parse_number(flag: str, text: str | float | None) -> float | None:
    """'1e21', '70B', '1.4T', '400M' -> float, checked against BOUNDS; a bad value names its flag."""
    if text is None:
        return None
    raw = str(text).strip().replace("_", "").replace(",", "")
    scale = SUFFIXES.get(raw[-1:].lower(), 1.0) if raw and raw[-1:].isalpha() else 1.0
    try:
        value = float(raw[:-1] if scale != 1.0 else raw) * scale
    except ValueError:
        raise KilnError(f"--{flag.replace('_', '-')}: {text!r} is not a number") from None
    lo, hi = BOUNDS[flag]
    if not math.isfinite(value) or value <= 0 and lo > 0 or value < lo or value > hi:
        raise KilnError(f"--{flag.replace('_', '-')}: {text} is outside the sensible range [{lo:g}, {hi:g}]")
    return value


@dataclass
class Request:
    flops: float | None = None
    gpu: str | None = None
    gpus: int | None = None
    days: float | None = None
    budget_usd: float | None = None
    price_per_gpu_hour: float | None = None
    mfu: float | None = None
    params: float | None = None
    tokens: float | None = None
    law: str = DEFAULT_LAW
    inference_tokens: float | None = None
    unique_tokens: float | None = None
    target_loss: float | None = None
    law_given: bool = False
    hparams: str = "deepseek"
    vocab: int = DEFAULT_VOCAB
    seq_len: int | None = None
    pue: float = costs.DEFAULT_PUE
    headroom: float = DEFAULT_HEADROOM
    max_days: float = MAX_AUTO_DAYS
    name: str = "planned"
    data: str = "data/train"
    notes: list = field(default_factory=list)


def check_flags(r: Request) -> None:
    """Contradictory or incomplete flag sets: one line naming the conflict."""
    budgets = [f for f, v in (("--flops", r.flops), ("--days", r.days), ("--budget-usd", r.budget_usd),
                              ("--target-loss", r.target_loss)) if v]
    if len(budgets) > 1:
        raise KilnError(f"give one budget, not {' and '.join(budgets)}")
    if budgets and r.params and r.tokens:
        raise KilnError(f"--params and --tokens fix the run's compute already; drop {budgets[0]}")
    if r.days and not (r.gpu and r.gpus):
        raise KilnError("--days needs --gpu NAME and --gpus N")
    if r.budget_usd and not r.gpu:
        raise KilnError("--budget-usd needs --gpu NAME")
    if r.price_per_gpu_hour and not r.gpu:
        raise KilnError("--price-per-gpu-hour needs --gpu NAME")
    if r.gpus and not r.gpu:
        raise KilnError("--gpus needs --gpu NAME")
    if r.mfu and not r.gpu:
        raise KilnError("--mfu needs --gpu NAME")
    if not budgets and not (r.params or r.tokens):
        raise KilnError("give a budget: --flops C, --gpu NAME --gpus N --days D, --budget-usd X --gpu NAME, "
                        "--target-loss L, or fix the model with --params and/or --tokens")
    if r.target_loss and (r.params or r.tokens):
        raise KilnError("--target-loss chooses N and D itself; drop --params/--tokens")
    if r.inference_tokens and bool(r.params) != bool(r.tokens):
        raise KilnError("--inference-tokens chooses N and D itself: drop --params/--tokens, or give both "
                        "(then the plan matches that model's loss at the least lifetime cost)")
    if r.unique_tokens:
        if r.law_given and r.law != "muennighoff":
            raise KilnError(f"--unique-tokens uses Muennighoff et al.'s repeated-data law; drop --law {r.law}")
        if r.inference_tokens or r.target_loss:
            raise KilnError("--unique-tokens does not combine with --inference-tokens or --target-loss")
        if r.tokens and r.tokens < r.unique_tokens:
            raise KilnError(f"--unique-tokens {r.unique_tokens:g} exceeds --tokens {r.tokens:g}: "
                            "a run cannot see more unique tokens than it trains on")
    elif r.law == "muennighoff":
        raise KilnError("--law muennighoff needs --unique-tokens U (the law is about repeating U unique tokens)")


def budget_flops(r: Request, acc: Accelerator | None, mfu: float) -> float | None:
    if r.flops:
        return r.flops
    if r.days:
        return r.gpus * r.days * 86400 * acc.peak_flops * mfu
    if r.budget_usd:
        price = r.price_per_gpu_hour or acc.price_usd_per_hour
        return r.budget_usd / price * 3600 * acc.peak_flops * mfu
    return None


def _invert(law, target: float, index: int) -> float:
    """The budget C at which the law's optimal N (index 0) or D (index 1) equals target."""
    lo, hi = 1.0, 1e40
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if law.optimum(mid)[index] < target else (lo, mid)
    return math.sqrt(lo * hi)


def law_point(r: Request, law, c: float | None) -> tuple[float, float]:
    """(N, D) before shaping."""
    if (r.inference_tokens or r.target_loss) and not isinstance(law, ParametricLaw):
        raise KilnError(f"--inference-tokens and --target-loss need a law with a loss formula "
                        f"(chinchilla-3, epoch, sardana, or a fit), not {law.name}")
    if r.params and r.tokens and r.inference_tokens:  # Sardana: that model's loss, least lifetime cost
        return inference_optimum_at_loss(law, law.loss(r.params, r.tokens), r.inference_tokens)
    if r.params and r.tokens:
        return r.params, r.tokens
    if r.params:
        return r.params, (c / (6 * r.params) if c else law.optimum(_invert(law, r.params, 0))[1])
    if r.tokens:
        return (c / (6 * r.tokens) if c else law.optimum(_invert(law, r.tokens, 1))[0]), r.tokens
    if r.target_loss:
        return inference_optimum_at_loss(law, r.target_loss, r.inference_tokens or 0.0)
    if r.inference_tokens:
        return inference_optimum(law, c, r.inference_tokens)
    if r.unique_tokens:
        return MUENNIGHOFF.optimum(c, r.unique_tokens)
    return law.optimum(c)


def default_seq_len(params: float) -> int:
    return 2048 if params < 1e9 else 4096


def make_plan(r: Request) -> dict:
    check_flags(r)
    acc = lookup(r.gpu) if r.gpu else None
    mfu_default = costs.default_mfu(acc) if acc else None
    mfu = r.mfu or (mfu_default.mfu if acc else costs.DEFAULT_MFU)
    law = MUENNIGHOFF.base if r.unique_tokens else get_law(r.law)
    c = budget_flops(r, acc, mfu)
    n_law, d_law = law_point(r, law, c)
    seq_len = r.seq_len or default_seq_len(n_law)
    shape = search_shape(n_law, r.vocab, seq_len, name=r.name)
    if r.days or r.budget_usd:
        # A time or dollar budget buys model FLOPs (PaLM count, what MFU measures), not 6ND:
        # shrink the law's C by 6N / FLOPs-per-token until the shape settles.
        hw_flops = c
        for _ in range(4):
            c = hw_flops * 6 * shape.params / shape.flops_per_token
            n_law, d_law = law_point(r, law, c)
            seq_len = r.seq_len or default_seq_len(n_law)
            shape = search_shape(n_law, r.vocab, seq_len, name=r.name)
    n = shape.params
    tokens = r.tokens if r.tokens and not r.inference_tokens else n_law * d_law / n  # keep the compute 6ND when N moves to the shape
    loss = MUENNIGHOFF.loss(n, tokens, r.unique_tokens) if r.unique_tokens else law.loss(n, tokens)
    hp = costs.hyperparameters(r.hparams, shape.model, seq_len, n, tokens)
    out = {
        "law": law.name, "law_source": law.source,
        "compute_flops": 6 * n * tokens, "budget_flops": c,
        "params_opt": n_law, "params": n, "tokens": tokens, "tokens_per_param": tokens / n,
        "predicted_loss": loss,
        "model": shape.as_dict(),
        "flops_per_token": shape.flops_per_token,
        "appendix_f_flops_per_token": shape.appendix_f_flops_per_token,
        "model_flops": shape.flops_per_token * tokens,
        "appendix_f_flops": shape.appendix_f_flops_per_token * tokens,
        "lr": hp["lr"], "batch_tokens_opt": hp["batch_tokens"], "hparams": hp,
        "inference_tokens": r.inference_tokens,
        "gpu": acc.name if acc else None, "gpus": None, "mfu": mfu if acc else None,
        "layout": None, "memory_gib_per_gpu": None, "memory_breakdown_gib": None,
        "gpu_hours": None, "wall_days": None, "cost_usd": None, "energy_kwh": None,
        "assumptions": {},
    }
    if r.inference_tokens or r.target_loss:
        if r.target_loss:
            target = r.target_loss
        elif r.params and r.tokens:
            target = law.loss(r.params, r.tokens)
        else:
            target = law.loss(*law.optimum(c))
        n0, d0 = inference_optimum_at_loss(law, target, 0.0)
        out["target_loss"] = target
        out["compute_optimal"] = {"params": n0, "tokens": d0, "loss": law.loss(n0, d0)}
        out["total_flops_with_inference"] = 6 * n * tokens + 2 * n * (r.inference_tokens or 0.0)
        out["law_params_tokens"] = [n_law, d_law]
    if r.unique_tokens:
        n0, d0 = law.optimum(6 * n * tokens)
        out["unique_tokens"] = r.unique_tokens
        out["epochs"] = tokens / r.unique_tokens
        out["unconstrained"] = {"params": n0, "tokens": d0, "loss": MUENNIGHOFF.loss(n0, d0, r.unique_tokens),
                                "loss_if_unique": law.loss(n0, d0)}
    if acc:
        _add_hardware(out, r, acc, mfu, shape)
        out["mfu_source"] = "given (--mfu)" if r.mfu else mfu_default.source
    out["_shape"] = shape
    return out


def _add_hardware(out: dict, r: Request, acc: Accelerator, mfu: float, shape: Shape) -> None:
    gpus = r.gpus or _auto_gpus(out, r, acc, mfu, shape)
    plan = choose_layout(shape.model, shape.seq_len, acc, gpus, out["batch_tokens_opt"], r.headroom)
    lay = plan.layout
    run = costs.run_cost(out["model_flops"], acc, gpus, mfu, r.price_per_gpu_hour, r.pue)
    out.update({
        "gpus": gpus,
        "layout": {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "fsdp": True, "micro_batch": lay.micro_batch,
                   "pp_microbatches": lay.pp_microbatches, "grad_accum": lay.grad_accum,
                   "global_batch_tokens": plan.global_batch_tokens,
                   "activation_checkpoint": lay.activation_checkpoint,
                   "sequence_parallel": lay.sequence_parallel},
        "steps": math.ceil(out["tokens"] / plan.global_batch_tokens),
        "memory_gib_per_gpu": plan.memory["total"] / GIB,
        "memory_breakdown_gib": {k: v / GIB for k, v in plan.memory.items()},
        "memory_usable_gib": acc.memory_bytes * r.headroom / GIB,
        "gpu_hours": run.gpu_hours, "wall_days": run.wall_days, "cost_usd": run.cost_usd,
        "price_per_gpu_hour": run.price_usd_per_hour, "pue": r.pue,
        "energy_kwh": run.energy_kwh,
    })
    a = out["assumptions"]
    a["mfu"] = (f"{mfu:.1%} (given)" if r.mfu else
                f"{mfu:.1%}, default for {acc.name} from {costs.default_mfu(acc).source}; pass --mfu")
    a["price"] = (f"${run.price_usd_per_hour:.2f}/GPU-hour" +
                  (" (given)" if r.price_per_gpu_hour else f" ({acc.price_note}; pass --price-per-gpu-hour)"))
    a["power"] = (f"TDP {acc.tdp_w:g} W x PUE {r.pue:g}" if acc.tdp_w else "no TDP in the table: energy n/a")
    a["memory"] = f"{r.headroom:.0%} of {acc.memory_gb:g} GB usable; FSDP over all data-parallel ranks"
    if not r.gpus:
        a["gpus"] = f"chosen: the fewest GPUs (1, 2, 4, then multiples of 8) that fit memory and finish within {r.max_days:g} days"


def _auto_gpus(out: dict, r: Request, acc: Accelerator, mfu: float, shape: Shape) -> int:
    limit = int(BOUNDS["gpus"][1])  # never choose more than --gpus accepts
    counts = [g for g in [1, 2, 4] + [GPUS_PER_NODE * 2 ** k for k in range(18)] if g <= limit]
    last_error = None
    for g in counts:
        run = costs.run_cost(out["model_flops"], acc, g, mfu)
        if run.wall_days > r.max_days:
            continue
        try:
            choose_layout(shape.model, shape.seq_len, acc, g, out["batch_tokens_opt"], r.headroom)
            return g
        except KilnError as exc:
            last_error = exc
    raise KilnError(f"no GPU count up to {counts[-1]} finishes within {r.max_days:g} days and fits memory"
                    + (f" ({last_error})" if last_error else "") + "; pass --gpus or --max-days")


def to_config(plan: dict, data_path: str, launcher: str | None = None):
    """A complete kiln training config for the plan (needs a GPU layout)."""
    from kiln.config import (ClusterConfig, Config, DataConfig, OptimConfig, ParallelConfig, TrainConfig,
                             CheckpointConfig, validate)

    if not plan.get("layout"):
        raise KilnError("--out needs a GPU: pass --gpu NAME (and --gpus N)")
    shape: Shape = plan["_shape"]
    lay, gpus = plan["layout"], plan["gpus"]
    steps = plan["steps"]
    nodes = math.ceil(gpus / GPUS_PER_NODE)
    per_node = min(gpus, GPUS_PER_NODE)
    if gpus % per_node:
        raise KilnError(f"--gpus {gpus} does not fill whole {GPUS_PER_NODE}-GPU nodes; use a multiple of 8")
    pipelined = lay["pp"] > 1
    cfg = Config(
        model=shape.model,
        parallel=ParallelConfig(pp=lay["pp"], tp=lay["tp"], dp_shard=lay["dp"], sequence_parallel=lay["tp"] > 1,
                                activation_checkpoint=lay["activation_checkpoint"],
                                pp_microbatches=lay["pp_microbatches"] if pipelined else None),
        data=DataConfig(path=data_path, seq_len=shape.seq_len),
        optim=OptimConfig(lr=float(f"{plan['lr']:.3g}"), warmup_steps=min(2000, max(1, steps // 10))),
        train=TrainConfig(name=shape.model.name, steps=steps,
                          micro_batch=lay["micro_batch"] * (lay["pp_microbatches"] if pipelined else 1),
                          global_batch_tokens=lay["global_batch_tokens"], device="auto",
                          eval_every=math.ceil(steps / EVALS_PER_RUN)),
        checkpoint=CheckpointConfig(every=math.ceil(steps / CHECKPOINTS_PER_RUN)),
        cluster=ClusterConfig(launcher=launcher or ("slurm" if nodes > 1 else "local"), nodes=nodes,
                              gpus_per_node=per_node),
    )
    validate(cfg)
    return cfg
