"""Verbs `kiln train` and `kiln generate`."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from kiln.cli import add_config_args, load_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train (or resume) a model in this process or as one worker of a job",
                       description="Train a model. CONFIG files merge left to right; key=value overrides win. "
                                   "Resumes from <run_dir>/<name>/checkpoints/latest when present.")
    add_config_args(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    p.set_defaults(func=_train)

    g = sub.add_parser("generate", help="sample text from a checkpoint")
    g.add_argument("checkpoint", help="run directory or checkpoint step directory")
    g.add_argument("--prompt", default=None, help="text to continue (needs the run's tokenizer)")
    g.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of text")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=_generate)


def _train(args) -> int:
    import torch.distributed as dist

    from kiln.errors import KilnError
    from kiln.launcher.bootstrap import shutdown
    from kiln.train import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = load_from_args(args)
    try:
        summary = train(cfg)
    except KilnError as exc:
        if not dist.is_initialized():
            raise
        # A worker of a job: report and leave at once. No collectives (other ranks may be stuck in one);
        # the launcher tears the rest of the job down.
        print(f"kiln: {exc}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(exc.exit_code)
    if args.json:
        print(json.dumps(summary))
    shutdown(requeue=summary["requeue"] and summary["stopped_early"])
    return 0


def _generate(args) -> int:
    from kiln.errors import KilnError
    from kiln.checkpoint.kiln_format import resolve_step_dir
    from kiln.generate import load_model, sample

    step_dir = resolve_step_dir(args.checkpoint)
    model, cfg = load_model(step_dir)
    tok = None
    if args.prompt_ids:
        prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
    else:
        if args.prompt is None:
            raise KilnError("give --prompt TEXT or --prompt-ids 1,2,3")
        from kiln.data.tokenizer import run_tokenizer

        tok = run_tokenizer(step_dir.parent.parent, cfg.data.path)
        prompt = tok.encode(args.prompt)
    out = sample(model, prompt, args.max_new_tokens, args.temperature, args.top_k,
                 eos_id=tok.eos_id if tok else None, seed=args.seed)
    text = tok.decode(out) if tok else None
    if args.json:
        print(json.dumps({"prompt_ids": prompt, "ids": out, "text": text}))
    else:
        print((args.prompt or "") + text if tok else " ".join(map(str, out)))
    return 0
