"""Verbs `kiln train` and `kiln generate`."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from kiln.cli import DefaultsHelpFormatter, add_config_args, load_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train (or resume) a model in this process or as one worker of a job",
                       description="Train a model. CONFIG files merge left to right; key=value overrides win. "
                                   "Resumes from <run_dir>/<name>/checkpoints/latest when present.")
    add_config_args(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    p.set_defaults(func=_train)

    g = sub.add_parser("generate", help="sample text from a checkpoint",
                       formatter_class=DefaultsHelpFormatter,
                       description="Continue a prompt with a trained model: the newest complete checkpoint of a "
                                   "run (or the step directory given), the run's tokenizer. Prints which "
                                   "checkpoint and step it loaded (on stderr), then the prompt and its continuation.")
    g.add_argument("checkpoint", help="run directory (runs/NAME) or checkpoint step directory")
    g.add_argument("--prompt", default=None, help="text to continue, encoded with the run's tokenizer "
                   "(default: none; give --prompt or --prompt-ids)")
    g.add_argument("--prompt-ids", default=None,
                   help="comma-separated token ids instead of --prompt, for runs on synthetic data (no "
                        "tokenizer) (default: none)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="stop after this many new tokens (or at EOS)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy; above 0: sample from softmax(logits / temperature)")
    g.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens (default: all tokens)")
    g.add_argument("--seed", type=int, default=0, help="random seed for sampling (same seed, same text)")
    g.add_argument("--json", action="store_true", help="print prompt ids, new ids, text, checkpoint and step as JSON")
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
    step = _checkpoint_step(step_dir)
    print(f"loaded {step_dir} (step {step})", file=sys.stderr, flush=True)
    tok = None
    if args.prompt_ids:
        prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
    else:
        if args.prompt is None:
            raise KilnError("give --prompt TEXT or --prompt-ids 1,2,3")
        if not cfg.data.path:
            raise KilnError("this run has no tokenizer (synthetic data): use --prompt-ids")
        from kiln.data.tokenizer import load_tokenizer

        tok = load_tokenizer(cfg.data.path)
        prompt = tok.encode(args.prompt)
    out = sample(model, prompt, args.max_new_tokens, args.temperature, args.top_k,
                 eos_id=tok.eos_id if tok else None, seed=args.seed)
    text = tok.decode(out) if tok else None
    if args.json:
        print(json.dumps({"prompt_ids": prompt, "ids": out, "text": text, "checkpoint": str(step_dir), "step": step}))
    else:
        shown = (args.prompt or "") + text if tok else " ".join(map(str, out))
        sys.stdout.write(shown if shown.endswith("\n") else shown + "\n")  # the shell prompt starts on its own line
    return 0


def _checkpoint_step(step_dir) -> int | None:
    """The step recorded in the checkpoint's meta.json (None for a checkpoint without one)."""
    from pathlib import Path

    meta = Path(step_dir) / "meta.json"
    try:
        return int(json.loads(meta.read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
