"""The `kiln` command: one verb per user job. Thin: the work lives in the packages.

Each package contributes its verbs through a `register(subparsers)` function in its
`commands` module; verb modules keep heavy imports (torch) inside their handlers so that
`kiln --help` stays fast. A `KilnError` prints one line and exits 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from kiln.errors import KilnError

VERB_MODULES = (
    "kiln.planner.commands",  # plan, estimate
    "kiln.data.commands",  # data prepare|inspect
    "kiln.train_commands",  # train, generate
    "kiln.launcher.commands",  # launch, submit, status
    "kiln.checkpoint.commands",  # convert
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
    try:
        return int(args.func(args) or 0)
    except KilnError as exc:
        print(f"kiln: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
