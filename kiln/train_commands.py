"""Verbs `kiln train` and `kiln generate`."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time

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


PEER_GRACE_S = 5.0  # how long a worker whose collective failed waits for the launcher's stop signal


def _train(args) -> int:
    import torch.distributed as dist

    from kiln.distributed import current, shutdown, signals
    from kiln.errors import KilnError
    from kiln.train import train

    stop = signals.install_stop_handlers()  # before anything slow: a Ctrl-C during startup is kept
    signals.watch_launcher()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        summary = train(load_from_args(args))
    except KilnError as exc:
        _record_error(f"kiln: {exc}")
        if not dist.is_initialized():
            raise
        # A worker of a job: report and leave at once. No collectives (other ranks may be stuck in one);
        # the launcher tears the rest of the job down.
        print(f"kiln: {exc}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(exc.exit_code)
    except Exception as exc:
        # A collective fails on every survivor when one worker dies; the launcher then signals them.
        # That error is a consequence: one line, not a traceback per rank. A signal-free failure is a
        # bug of this rank and keeps its traceback.
        if not (dist.is_initialized() and dist.get_world_size() > 1) or not signals.wait_for_stop(PEER_GRACE_S):
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        name = signal.Signals(stop.signum).name
        print(f"kiln: rank {dist.get_rank()}: stopped by {name} after {type(exc).__name__}: {first}",
              file=sys.stderr, flush=True)
        os._exit(128 + stop.signum if stop.interrupted else 1)
    if args.json:
        print(json.dumps(summary))
    code = 128 + stop.signum if stop.interrupted and summary["stopped_early"] else 0
    info = current()
    if code and (info is None or info.rank == 0):
        print(f"kiln: stopped by {signal.Signals(stop.signum).name} at step {summary['step']} with a checkpoint; "
              f"the same command resumes", file=sys.stderr, flush=True)
    shutdown(requeue=summary["requeue"] and summary["stopped_early"], exit_code=code)
    return code


def _record_error(message: str) -> None:
    """Hand the one-line error to the elastic agent (its per-worker error file), so `kiln launch`
    can name it when it gives up."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w") as f:
                json.dump({"message": message, "timestamp": int(time.time())}, f)
        except OSError:
            pass


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
        from kiln.data.tokenizer import run_tokenizer

        tok = run_tokenizer(step_dir.parent.parent, cfg.data.path)
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
