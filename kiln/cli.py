"""The `kiln` command: one verb per user job. Thin: the work lives in the packages.

Each package contributes its verbs through a `register(subparsers)` function in its
`commands` module; verb modules keep heavy imports (torch) inside their handlers so that
`kiln --help` stays fast. A `KilnError` prints one line and exits 2; Ctrl-C or SIGTERM print
"kiln: interrupted" and exit 130 or 143; a closed output pipe (`| head`) ends quietly.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from typing import Sequence

from kiln.errors import KilnError

VERB_MODULES = (
    "kiln.planner.commands",  # plan, estimate
    "kiln.data.commands",  # data prepare|inspect
    "kiln.train_commands",  # train, generate
    "kiln.launcher.commands",  # launch, submit, status
    "kiln.convert.commands",  # convert
)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to every option that has a value by default; options whose default is
    "unset" (None) or off (flags) say in their own help what that means."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("%(default)" not in text and action.option_strings and not action.required
                and not any(action.default is v for v in (None, False, argparse.SUPPRESS))):
            text += " (default: %(default)s)"
        return text


def add_config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """CONFIG files and key=value overrides, in any order: files merge left to right."""
    parser.add_argument("config", nargs="+" if required else "*", metavar="CONFIG|KEY=VALUE",
                        help="YAML config files (merged left to right) and dotted key=value overrides")


def split_config_args(items: Sequence[str]) -> tuple[list[str], list[str]]:
    paths = [i for i in items if "=" not in i]
    overrides = [i for i in items if "=" in i]
    return paths, overrides


def env_overrides() -> list[str]:
    """`key=value` overrides from $KILN_OVERRIDES (shell-quoted, space-separated), applied after the
    command line's: a way to change every command of a script at once (the docs check shortens runs so)."""
    import os
    import shlex

    return shlex.split(os.environ.get("KILN_OVERRIDES", ""))


def load_from_args(args: argparse.Namespace):
    from kiln.config import load_config

    paths, overrides = split_config_args(args.config)
    return load_config(paths, overrides + env_overrides())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description="Plan, launch and run LLM pretraining.")
    parser.add_argument("--version", action="version", version=f"kiln {_version()}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _version() -> str:
    from kiln import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    from kiln.distributed.signals import Interrupted, raise_interrupted

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, raise_interrupted)  # like Ctrl-C: one line, exit 143
    try:
        code = _run(argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except KilnError as exc:
        print(f"kiln: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        return 130
    except Interrupted as exc:
        print("kiln: interrupted", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # `kiln plan ... | head`: the reader left. Python's recipe: point stdout at devnull so the
        # interpreter's final flush cannot fail again, and leave quietly as a SIGPIPE'd program would.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    finally:
        if previous is not None:  # main() called in-process (tests, notebooks) leaves no handler behind
            signal.signal(signal.SIGTERM, previous)


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may also follow the flags: `kiln launch c.yaml --nproc 2 train.steps=9`
        if hasattr(args, "config") and all("=" in e and not e.startswith("-") for e in extra):
            args.config += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
