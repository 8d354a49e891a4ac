"""`kiln plan`, `kiln plan fit` and `kiln estimate`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from kiln.errors import KilnError

NUMBER_FLAGS = ("flops", "days", "budget_usd", "price_per_gpu_hour", "mfu", "params", "tokens",
                "inference_tokens", "unique_tokens", "target_loss", "pue", "headroom", "max_days")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="budget -> model shape, tokens, layout, cost (or `plan fit` your own runs)",
        description="Turn a compute, time or dollar budget into a model shape, token count, parallel layout "
                    "and cost. Numbers accept suffixes: 1e21, 70B, 1.4T, 400M. "
                    "`kiln plan fit RUNS...` fits a scaling law to your own runs instead.")
    budget = p.add_argument_group("budget (one of)")
    budget.add_argument("--flops", metavar="C", help="training compute in FLOPs, C = 6ND (default: none; give one budget)")
    budget.add_argument("--days", metavar="D", help="wall-clock days on --gpus x --gpu (default: none)")
    budget.add_argument("--budget-usd", metavar="X", help="dollars at --price-per-gpu-hour (default: none)")
    budget.add_argument("--target-loss", metavar="L", help="reach this loss under --law at the least cost "
                        "(with --inference-tokens: least training + inference cost; default: none)")
    model = p.add_argument_group("fix the model")
    model.add_argument("--params", metavar="N", help="parameters, solve for tokens (default: from the law)")
    model.add_argument("--tokens", metavar="D", help="training tokens, solve for parameters (default: from the law)")
    hw = p.add_argument_group("hardware and cost")
    hw.add_argument("--gpu", metavar="NAME", help="accelerator: h100, h200, a100, b200, mi300x, ... (default: none, "
                    "no layout or cost)")
    hw.add_argument("--gpus", metavar="N", type=_int_or_str, help="GPU count (default: fewest that fit and "
                    "finish within --max-days)")
    hw.add_argument("--mfu", metavar="U", help="model FLOPs utilisation, 0-0.99 (default: the published run for the "
                    "GPU's generation, printed with its source; 40%% where there is none)")
    hw.add_argument("--price-per-gpu-hour", metavar="P", help="USD per GPU-hour (default: the hardware table's assumed rate)")
    hw.add_argument("--pue", metavar="X", default="1.2", help="data-centre PUE for energy (default 1.2)")
    hw.add_argument("--headroom", metavar="F", default="0.9", help="usable fraction of GPU memory (default 0.9)")
    hw.add_argument("--max-days", metavar="D", default="30", help="wall-clock limit when choosing --gpus (default 30)")
    law = p.add_argument_group("law and shape")
    law.add_argument("--law", default=None, help="chinchilla-1 | chinchilla-2 | chinchilla-3 | epoch | sardana | "
                     "kaplan | a law file from `kiln plan fit` (default epoch; muennighoff with --unique-tokens)")
    law.add_argument("--inference-tokens", metavar="T", help="lifetime inference tokens: Sardana et al.'s "
                     "inference-aware optimum (default: none)")
    law.add_argument("--unique-tokens", metavar="U", help="unique tokens available: Muennighoff et al.'s "
                     "repeated-data law chooses N, D and epochs (default: unlimited data)")
    law.add_argument("--hparams", default="deepseek", metavar="RULE", help="rule for peak LR and global batch: "
                     "deepseek (DeepSeek LLM fits) | kaplan (Kaplan's critical batch) | porian (Porian et al.'s "
                     "fits in model size) (default deepseek)")
    law.add_argument("--compare", action="store_true", help="print every law side by side at this budget (default: off)")
    law.add_argument("--vocab", type=int, default=32000, help="tokenizer vocabulary size (default 32000)")
    law.add_argument("--seq-len", type=int, help="sequence length (default 2048 below 1B params, else 4096)")
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="machine-readable output (default: a table)")
    out.add_argument("--out", metavar="PLAN.yaml", help="write a complete kiln training config (default: none)")
    out.add_argument("--data", default="data/train", help="data.path written into --out (default data/train)")
    out.add_argument("--name", default=None, help="run name written into --out (default: plan-<size>)")
    out.add_argument("--plot", metavar="FILE.png", help="draw IsoFLOP curves and the laws' frontiers (default: none)")
    p.set_defaults(func=plan_command)
    _refuse_repeats(p)

    modes = p.add_subparsers(dest="plan_mode", metavar="fit|grow", required=False)
    f = modes.add_parser("fit", help="fit L(N,D) = E + A/N^alpha + B/D^beta to your runs",
                         description="Fit the Chinchilla parametric law to final losses (Huber on log L, L-BFGS, "
                                     "grid of starts) with bootstrap intervals. RUNS are run directories "
                                     "(metrics.jsonl + config.yaml), metrics.jsonl files, or CSV/JSON tables "
                                     "with params, tokens, loss columns.")
    f.add_argument("runs", nargs="+", metavar="RUN|TABLE")
    f.add_argument("--out", default="law.json", help="law file for `kiln plan --law FILE` (default law.json)")
    f.add_argument("--plot", metavar="FILE.png", help="fit against points (default: next to --out)")
    f.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples (default 200; 0: none)")
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=fit_command)
    _refuse_repeats(f)

    g = modes.add_parser("grow", help="price a growth schedule (small model, then `kiln grow`) against scratch",
                         description="Cost of training SMALL for --small-tokens, growing it function-preservingly "
                                     "into LARGE (kiln grow) and training that for --large-tokens, against training "
                                     "LARGE from scratch for the sum (or --scratch-tokens). FLOPs are 6N + 12LHQT "
                                     "per token, as kiln's MFU counts them.")
    g.add_argument("small", metavar="SMALL.yaml", help="config (or model recipe) of the model trained first")
    g.add_argument("large", metavar="LARGE.yaml", help="config (or model recipe) of the grown model")
    g.add_argument("--small-tokens", required=True, metavar="D1", help="tokens for the small model (required)")
    g.add_argument("--large-tokens", required=True, metavar="D2", help="tokens after growth (required)")
    g.add_argument("--scratch-tokens", metavar="D", help="tokens for the scratch run (default: D1 + D2)")
    g.add_argument("--gpu", required=True, metavar="NAME", help="accelerator (required)")
    g.add_argument("--gpus", required=True, type=_int_or_str, metavar="N", help="GPU count (required)")
    g.add_argument("--mfu", metavar="U", help="model FLOPs utilisation (default: the published run for this GPU)")
    g.add_argument("--price-per-gpu-hour", metavar="P", help="USD per GPU-hour (default: the hardware table)")
    g.add_argument("--seq-len", type=int, default=2048, help="sequence length")
    g.add_argument("--json", action="store_true", help="machine-readable output (default: a table)")
    g.set_defaults(func=grow_plan_command)
    _refuse_repeats(g)

    e = subparsers.add_parser("estimate", help="per-GPU memory and cost of an existing config",
                              description="Estimate per-GPU memory (and time/cost) of a config on N GPUs; "
                                          "exit 2 naming the largest term when it does not fit.")
    from kiln.cli import add_config_args

    add_config_args(e)
    e.add_argument("--gpu", required=True, metavar="NAME", help="accelerator (required; h100, h200, a100, b200, "
                   "mi300x, ...; an unknown name lists the known ones)")
    e.add_argument("--gpus", required=True, type=_int_or_str, metavar="N", help="GPU count (required)")
    e.add_argument("--mfu", metavar="U", help="model FLOPs utilisation, 0-0.99 (default: the plan's, from a "
                   "`kiln plan --out` file, else the published run for this GPU generation)")
    e.add_argument("--price-per-gpu-hour", metavar="P", help="USD per GPU-hour (default: the plan's for the same "
                   "GPU, else the hardware table)")
    e.add_argument("--pue", metavar="X", help="data-centre PUE for energy (default: the plan's, else 1.2)")
    e.add_argument("--headroom", metavar="F", default="0.9", help="usable fraction of GPU memory (default 0.9)")
    e.add_argument("--measure", action="store_true", help="also run one real training step of this config for "
                   "rank 0 (and a pipeline's last stage) on the CPU with fake tensors (no weights allocated) and report the measured peak per "
                   "category; the fit decision then uses the measurement (default: formula only)")
    e.add_argument("--json", action="store_true", help="machine-readable output (default: a table)")
    e.set_defaults(func=estimate_command)
    _refuse_repeats(e)


def _refuse_repeats(parser) -> None:
    """argparse keeps the last of a repeated option silently (`--flops 1e21 --flops 1e22`); wrap
    every option's action to note repeats, refused as one line by the command (`_check_repeats`)."""
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        original = action.__class__.__call__

        def call(self_, parser_, namespace, values, option_string=None, _orig=original, _dest=action.dest):
            seen = getattr(namespace, "_seen_options", None)
            if seen is None:
                seen = set()
                setattr(namespace, "_seen_options", seen)
            if _dest in seen:
                repeated = getattr(namespace, "_repeated_options", [])
                setattr(namespace, "_repeated_options", repeated + [option_string])
            seen.add(_dest)
            return _orig(self_, parser_, namespace, values, option_string)

        action.__class__ = type(action.__class__.__name__, (action.__class__,), {"__call__": call})


def _check_repeats(args) -> None:
    repeated = getattr(args, "_repeated_options", None)
    if repeated:
        raise KilnError(f"{repeated[0]} given more than once; give each option once")


def _int_or_str(text: str):
    return text  # validated in the handler, so a bad value is one line, not argparse usage


def _gpus(value) -> int | None:
    if value is None:
        return None
    try:
        n = int(str(value))
    except ValueError:
        raise KilnError(f"--gpus: {value!r} is not a whole number") from None
    if not 1 <= n <= 1_000_000:
        raise KilnError(f"--gpus: {n} is outside [1, 1000000]")
    return n


def _numbers(args) -> dict:
    from kiln.planner.plan import parse_number

    return {k: parse_number(k, getattr(args, k)) for k in NUMBER_FLAGS if hasattr(args, k)}


def _request(args):
    from kiln.planner.plan import BOUNDS, Request

    nums = _numbers(args)
    for flag, value in (("vocab", args.vocab), ("seq_len", args.seq_len)):
        lo, hi = BOUNDS[flag]
        if value is not None and not lo <= value <= hi:
            raise KilnError(f"--{flag.replace('_', '-')}: {value} is outside [{lo:g}, {hi:g}]")
    from kiln.planner.laws import DEFAULT_LAW

    law = args.law or ("muennighoff" if nums.get("unique_tokens") else DEFAULT_LAW)
    return Request(gpu=args.gpu, gpus=_gpus(args.gpus), law=law, law_given=args.law is not None, vocab=args.vocab,
                   seq_len=args.seq_len, hparams=args.hparams, data=args.data, name=args.name or "planned",
                   **{k: v for k, v in nums.items() if v is not None})


# ---------------------------------------------------------------- plan
def plan_command(args) -> int:
    _check_repeats(args)
    from kiln.planner.plan import make_plan, to_config

    request = _request(args)
    if args.compare:
        return _compare(args, request)
    plan = make_plan(request)
    if args.name is None:
        plan["_shape"].model.name = f"plan-{_si(plan['params'])}"
    if args.out:
        from kiln.config import to_yaml

        cfg = to_config(plan, args.data)
        Path(args.out).write_text(_yaml_header(plan) + to_yaml(cfg))
        plan["out"] = args.out
    if args.plot:
        from kiln.planner.laws import get_law
        from kiln.planner.plot import plot_isoflops

        from kiln.planner.laws import MUENNIGHOFF

        plot_isoflops(plan, MUENNIGHOFF.base if request.unique_tokens else get_law(request.law), args.plot)
        plan["plot"] = args.plot
    shape = plan.pop("_shape")
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        print(render_plan(plan, shape))
    return 0


def _compare(args, request) -> int:
    from kiln.planner.laws import LAWS, get_law
    from kiln.planner.plan import check_flags, make_plan

    check_flags(request)
    if request.unique_tokens or request.inference_tokens or request.target_loss:
        raise KilnError("--compare compares the compute-optimal laws; drop --unique-tokens/--inference-tokens/"
                        "--target-loss")
    laws = dict(LAWS)
    if request.law not in laws:
        law = get_law(request.law)
        laws[law.name] = law
    rows = []
    for name, law in laws.items():
        if request.params and request.tokens:
            raise KilnError("--compare needs a budget, not a fixed --params and --tokens")
        request.law = args.law if name not in LAWS else name
        request.law_given = True
        plan = make_plan(request)
        plan.pop("_shape")
        rows.append({"law": name, "compute_flops": plan["budget_flops"] or plan["compute_flops"],
                     "params_opt": plan["params_opt"], "params": plan["params"], "tokens": plan["tokens"],
                     "tokens_per_param": plan["tokens_per_param"], "predicted_loss": plan["predicted_loss"],
                     "exponent_a": law.exponents[0], "source": law.source,
                     "cost_usd": plan["cost_usd"], "gpus": plan["gpus"]})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"laws at C = {rows[0]['compute_flops']:.3g} FLOPs")
    print(f"{'law':<14}{'N_opt':>9}{'N shape':>9}{'tokens':>9}{'D/N':>7}{'loss':>8}{'a':>7}   source")
    for r in rows:
        loss = "-" if r["predicted_loss"] is None else f"{r['predicted_loss']:.3f}"
        print(f"{r['law']:<14}{_si(r['params_opt']):>9}{_si(r['params']):>9}{_si(r['tokens']):>9}"
              f"{r['tokens_per_param']:>7.1f}{loss:>8}{r['exponent_a']:>7.3f}   {r['source']}")
    print("kaplan: N excludes embeddings and its loss is on WebText2: compare exponents, not values")
    return 0


def _amount(x: float) -> str:
    """Thousands separators for large amounts, three significant digits for small ones (a tiny
    budget prints $0.0123, not $0)."""
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}" if x < 1 else f"{x:.2f}".rstrip("0").rstrip(".")


def _si(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _yaml_header(plan: dict) -> str:
    lines = [f"# kiln plan: {plan['law']} law, C = {plan['compute_flops']:.3g} FLOPs, N = {plan['params']:,}, "
             f"D = {plan['tokens']:.4g} tokens",
             f"# {plan['gpus']} x {plan['gpu']}: ~{_amount(plan['wall_days'])} days, ~${_amount(plan['cost_usd'])} "
             f"(assumptions: {'; '.join(plan['assumptions'].values())})",
             f"# optim.lr and train.global_batch_tokens: --hparams {plan['hparams']['rule']}, "
             f"{plan['hparams']['source']}",
             "# kiln-plan-assumptions: " + json.dumps({"gpu": plan["gpu"], "gpus": plan["gpus"], "mfu": plan["mfu"],
                                                       "price_per_gpu_hour": plan["price_per_gpu_hour"],
                                                       "pue": plan["pue"]})]
    return "\n".join(lines) + "\n"


def render_plan(p: dict, shape) -> str:
    m = p["model"]
    loss = "n/a (this law has no loss formula)" if p["predicted_loss"] is None else f"{p['predicted_loss']:.3f}"
    rows = [
        ("law", f"{p['law']}: {p['law_source']}"),
        ("compute", f"{p['compute_flops']:.3g} FLOPs (6ND)" +
         (f"; budget {p['budget_flops']:.3g}" if p["budget_flops"] and abs(p["budget_flops"] / p["compute_flops"] - 1) > 1e-6 else "")),
        ("parameters", f"{p['params']:,} exact (law optimum {_si(p['params_opt'])})"),
        ("tokens", f"{_si(p['tokens'])} ({p['tokens_per_param']:.1f} tokens/parameter)"),
        ("predicted loss", loss),
        ("shape", f"{m['n_layers']} layers, d_model {m['d_model']}, {m['n_heads']} heads ({m['n_kv_heads']} KV), "
                  f"SwiGLU {m['ffn_dim']}, vocab {m['vocab_size']}, seq {m['seq_len']}"),
        ("FLOPs/token", f"PaLM 6N+12LHQT {p['flops_per_token']:.4g}; 6N {6 * p['params']:.4g}; "
                        f"Chinchilla App. F {p['appendix_f_flops_per_token']:.4g}"),
        ("training FLOPs", f"6ND {p['compute_flops']:.3g}; PaLM model {p['model_flops']:.3g}; "
                           f"App. F {p['appendix_f_flops']:.3g}"),
        ("hyperparameters", f"peak lr {p['lr']:.3g}, batch {_si(p['batch_tokens_opt'])} tokens ({p['hparams']['source']}); "
                            + "; ".join(f"{k}: lr {p['hparams']['lr_by_rule'][k]:.3g}, batch {_si(v)}"
                                        for k, v in p["hparams"]["batch_tokens_by_rule"].items())),
    ]
    if p.get("compute_optimal"):
        co = p["compute_optimal"]
        inf = p["inference_tokens"] or 0.0
        rows.append(("inference-aware", f"Sardana et al. 2024: loss {p['target_loss']:.4g} with {_si(inf)} inference "
                     f"tokens at the least 6ND + 2N D_inf: law optimum {_si(p['law_params_tokens'][0])} x "
                     f"{_si(p['law_params_tokens'][1])} (compute-optimal at that loss: {_si(co['params'])} x "
                     f"{_si(co['tokens'])}); training FLOPs {p['compute_flops']:.3g}, with inference "
                     f"{p['total_flops_with_inference']:.3g}"))
    if p.get("unique_tokens"):
        un = p["unconstrained"]
        rows.append(("repeated data", f"{_si(p['unique_tokens'])} unique tokens, {p['epochs']:.2f} epochs "
                     f"(Muennighoff et al. 2023); the unconstrained optimum {_si(un['params'])} x "
                     f"{_si(un['tokens'])} would reach {un['loss']:.3f} on this data "
                     f"({un['loss_if_unique']:.3f} with that many unique tokens)"))
    if p["layout"]:
        lay = p["layout"]
        mem = p["memory_breakdown_gib"]
        rows += [
            ("hardware", f"{p['gpus']} x {p['gpu']}, MFU {p['mfu']:.1%}"),
            ("layout", f"tp {lay['tp']}, pp {lay['pp']}, dp {lay['dp']} (FSDP), micro-batch {lay['micro_batch']}"
                       + (f" x {lay['pp_microbatches']} pipeline chunks" if lay["pp"] > 1 else "")
                       + f", grad-accum {lay['grad_accum']}, global batch {_si(lay['global_batch_tokens'])} tokens, "
                       f"recompute {lay['activation_checkpoint']}, {p['steps']:,} steps"),
            ("memory/GPU", f"{p['memory_gib_per_gpu']:.1f} GiB of {p['memory_usable_gib']:.1f} GiB usable: "
                           + ", ".join(f"{k} {v:.2f}" for k, v in mem.items() if k != "total")),
            ("cost", f"{_amount(p['gpu_hours'])} GPU-hours, {_amount(p['wall_days'])} days, "
                     f"${_amount(p['cost_usd'])}, "
                     + ("energy n/a" if p["energy_kwh"] is None else f"{_amount(p['energy_kwh'])} kWh")),
        ]
        rows += [(f"assumed: {k}", v) for k, v in p["assumptions"].items()]
    else:
        rows.append(("layout/cost", "pass --gpu NAME [--gpus N] for a layout, memory and cost"))
    for key in ("out", "plot"):
        if p.get(key):
            rows.append(("wrote", p[key]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# ---------------------------------------------------------------- fit
def fit_command(args) -> int:
    _check_repeats(args)
    from kiln.planner.fit import fit_law, load_points, save_law
    from kiln.planner.laws import load_law_file
    from kiln.planner.plot import plot_fit

    if args.bootstrap < 0:
        raise KilnError("--bootstrap must be >= 0")
    points = load_points(args.runs)
    n, d, l = zip(*points)
    result = fit_law(n, d, l, bootstrap=args.bootstrap)
    save_law(result, points, args.out)
    law = load_law_file(Path(args.out))
    plot_path = args.plot or str(Path(args.out).with_suffix(".png"))
    plot_fit(points, law, plot_path)
    result.update({"law_file": args.out, "plot": plot_path})
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    iv = result.get("intervals") or {}
    print(f"fitted L(N, D) = E + A/N^alpha + B/D^beta to {len(points)} runs (Huber delta 1e-3 on log L, L-BFGS)")
    for k in ("E", "A", "B", "alpha", "beta", "a"):
        ci = f"  [{iv[k][0]:.4g}, {iv[k][1]:.4g}] 95% bootstrap ({result['bootstrap']})" if k in iv else ""
        label = "a = beta/(alpha+beta)" if k == "a" else k
        print(f"  {label:<22}{result[k]:.4g}{ci}")
    print(f"  rms log residual      {result['rms_log_residual']:.3g}")
    for problem in result["problems"]:
        print(f"WARNING: the runs do not identify the law: {problem}; add runs spread over more model "
              f"sizes and token counts (see docs/planning.md, IsoFLOP recipe)")
    print(f"wrote {args.out} (use: kiln plan --law {args.out} ...) and {plot_path}")
    return 0


# ---------------------------------------------------------------- grow
def grow_plan_command(args) -> int:
    _check_repeats(args)
    from kiln.planner.growth import load_model_config, price_growth
    from kiln.planner.plan import BOUNDS, parse_number

    tokens = {k: parse_number("tokens", getattr(args, k)) for k in ("small_tokens", "large_tokens", "scratch_tokens")}
    lo, hi = BOUNDS["seq_len"]
    if not lo <= args.seq_len <= hi:
        raise KilnError(f"--seq-len: {args.seq_len} is outside [{lo:g}, {hi:g}]")
    r = price_growth(load_model_config(args.small), load_model_config(args.large), tokens["small_tokens"],
                     tokens["large_tokens"], args.seq_len, args.gpu, _gpus(args.gpus),
                     mfu=parse_number("mfu", args.mfu), price=parse_number("price_per_gpu_hour", args.price_per_gpu_hour),
                     scratch_tokens=tokens["scratch_tokens"])
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"growth schedule on {r['gpus']} x {r['gpu']} at MFU {r['mfu']:.1%}, seq {r['seq_len']}:")
    print(f"  {'phase':<9}{'params':>10}{'tokens':>10}{'FLOPs':>11}{'GPU-hours':>12}{'days':>12}{'USD':>12}")
    for p in r["phases"] + [dict(r["schedule"], phase="schedule", params=None), r["scratch"]]:
        params = _si(p["params"]) if p.get("params") else ""
        print(f"  {p['phase']:<9}{params:>10}{_si(p['tokens']):>10}{p['flops']:>11.3g}{_amount(p['gpu_hours']):>12}"
              f"{_amount(p['wall_days']):>12}{_amount(p['cost_usd']):>12}")
    print(f"growth saves {r['saving_fraction']:.1%} of the scratch run's FLOPs (same tokens; whether it reaches the same "
          f"loss is for your runs to show)")
    return 0


# ---------------------------------------------------------------- estimate
HINTS = {
    "activations": "set parallel.activation_checkpoint=full, lower train.micro_batch, or raise parallel.tp/pp",
    "logits": "lower train.micro_batch or raise parallel.tp",
    "optimizer": "use more GPUs (FSDP shards it over dp_shard) or raise parallel.tp/pp",
    "grads": "use more GPUs (FSDP shards it over dp_shard) or raise parallel.tp/pp",
    "weights": "use more GPUs (FSDP shards it over dp_shard) or raise parallel.tp/pp",
    "comm_buffers": "raise parallel.tp to shrink each layer's all-gather",
}


def estimate_command(args) -> int:
    _check_repeats(args)
    from kiln.cli import load_from_args
    from kiln.planner.estimate import estimate

    from kiln.cli import split_config_args
    from kiln.planner.estimate import plan_assumptions
    from kiln.hardware import lookup

    nums = _numbers(args)
    cfg = load_from_args(args)
    planned = plan_assumptions(split_config_args(args.config)[0])
    note = None
    if nums.get("mfu") is None and planned.get("mfu"):
        note = "from the plan's header (kiln plan --mfu)"
    if planned.get("gpu") != lookup(args.gpu).name:
        planned.pop("price_per_gpu_hour", None)  # the plan's price was for another accelerator
    pick = lambda k, default=None: nums.get(k) if nums.get(k) is not None else planned.get(k, default)  # noqa: E731
    result = estimate(cfg, args.gpu, _gpus(args.gpus), mfu=pick("mfu"), price=pick("price_per_gpu_hour"),
                      pue=pick("pue", 1.2), headroom=nums.get("headroom") or 0.9, mfu_note=note)
    if args.measure:
        from kiln.planner.measure import measure
        from kiln.planner.memory import GIB

        import contextlib

        # Libraries imported while measuring (DeepSpeed) log to stdout; --json's stdout stays JSON.
        with contextlib.redirect_stdout(sys.stderr):
            measured = measure(cfg, result["gpus"], progress=lambda line: print(line, file=sys.stderr, flush=True))
        result["measured_where"] = {k: int(measured.pop(k)) for k in ("rank", "stage") if k in measured}
        result["measured_gib"] = {k: v / GIB for k, v in measured.items()}
        result["fits"] = measured["total"] <= result["memory_usable_gib"] * GIB
        if not result["fits"]:
            terms = {k: v for k, v in result["measured_gib"].items() if k != "total"}
            result["largest_term"] = max(terms, key=terms.get)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render_estimate(result))
    if not result["fits"] and "measured_gib" in result:
        mem = result["measured_gib"]
        sys.stdout.flush()
        raise KilnError(f"does not fit (measured): {mem['total']:.1f} GiB per GPU > {result['memory_usable_gib']:.1f} "
                        f"GiB usable on {result['gpu']}; largest term {result['largest_term']} "
                        f"{mem[result['largest_term']]:.1f} GiB")
    if not result["fits"]:
        term = result["largest_term"]
        mem = result["memory_breakdown_gib"]
        sys.stdout.flush()
        margin = result["fit_margin"]
        raise KilnError(f"does not fit: {mem['total']:.1f} GiB per GPU (x {margin:g} margin for the formula's error: "
                        f"{mem['total'] * margin:.1f}) > {result['memory_usable_gib']:.1f} GiB usable on "
                        f"{result['gpu']}; largest term {term} {mem[term]:.1f} GiB ({HINTS[term]})")
    return 0


def render_estimate(r: dict) -> str:
    lay = r["layout"]
    cp = f"cp {lay['cp']} (ring attention), " if lay.get("cp", 1) > 1 else ""
    lines = [f"{r['params']:,} parameters on {r['gpus']} x {r['gpu']}: tp {lay['tp']}, pp {lay['pp']}, {cp}"
             f"dp {lay['dp']} (shard {lay['dp_shard']}, ZeRO-{lay['zero']}), micro-batch {lay['micro_batch']}, "
             f"recompute {lay['activation_checkpoint']}",
             f"per-GPU memory (GiB), {r['memory_usable_gib']:.1f} usable:"]
    measured = r.get("measured_gib")
    if measured:
        lines[-1] = (f"per-GPU memory (GiB), {r['memory_usable_gib']:.1f} usable: formula | measured peak "
                     f"(one fake-tensor training step of rank {r.get('measured_where', {}).get('rank', 0)}"
                     + (f", pipeline stage {r['measured_where']['stage']})" if r.get("measured_where", {}).get("stage")
                        else ")"))
    for k, v in r["memory_breakdown_gib"].items():
        lines.append(f"  {k:<13}{v:10.2f}" + (f"   {measured['total']:10.2f}" if measured and k == "total" else ""))
    if r.get("longest_seq_len") is not None:
        cp = lay.get("cp", 1)
        lines.append(f"longest data.seq_len that fits this layout: {r['longest_seq_len']:,} tokens"
                     + (f" ({r['longest_seq_len'] // cp:,} per GPU over cp {cp})" if cp > 1 else ""))
    if measured:
        lines.append("  measured: " + ", ".join(f"{k} {v:.2f}" for k, v in measured.items() if k != "total"))
    elif r.get("memory_caveat"):
        lines.append(f"  note: {r['memory_caveat']}")
    if r.get("gpu_hours") is not None:
        energy = "n/a" if r["energy_kwh"] is None else f"{_amount(r['energy_kwh'])} kWh"
        lines.append(f"{_si(r['tokens'])} tokens: {_amount(r['gpu_hours'])} GPU-hours, {_amount(r['wall_days'])} days, "
                     f"${_amount(r['cost_usd'])}, {energy} (assumptions: "
                     f"{'; '.join(r['assumptions'].values())})")
    return "\n".join(lines)
