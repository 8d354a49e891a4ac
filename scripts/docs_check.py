#!/usr/bin/env python3
"""Run every command the docs show, in the order a reader meets them, on a fresh clone.

Order: README.md, then the pages of README's documentation table in table order, then any other
docs/*.md (sorted). Runnable blocks are fenced ```bash, ```sh and ```console (there, the `$ ` lines);
yaml, python and plain blocks are not commands. All commands share one fresh clone (so one example's
outputs are there for the next, and an example that clobbers another's shows up as a failure) and
one shell state (exported variables carry over).

Made cheap and self-contained:
* KILN_OVERRIDES (default `train.steps=6`, see docs/configuration.md) shortens every training run;
* `pip install ...` and `python -m pytest` are not run: the environment is installed and the test
  suite run by CI before this check (.ci/run);
* a block preceded by `<!-- docs-check: skip REASON -->` is listed with its reason and not run
  (for commands that need a GPU, a real cluster, a user's data, or minutes of benchmarking).

Expected failures: a command followed by a comment (bash) or an output line (console) that starts with
`kiln: ` must exit with status 2 and print that line (its `...` parts are wildcards), so stale numbers in
documented errors fail the check too.

    python scripts/docs_check.py            # clone HEAD into a temp dir, run everything, print a report
    python scripts/docs_check.py --list     # only show the extracted commands
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^\s*```\s*([\w-]*)\s*$")
SKIP = re.compile(r"<!--\s*docs-check:\s*skip\s+(.+?)\s*-->")
TABLE_ROW = re.compile(r"^\|\s*\[[^\]]*\]\((docs/[^)#]+\.md)\)", re.M)
HEREDOC = re.compile(r"<<-?\s*(['\"]?)(\w+)\1")
RUNNABLE = {"bash", "sh", "shell", "console"}
DEFAULT_OVERRIDES = "train.steps=6"
PRELUDE = r"""
pip() { echo "docs-check: not run: pip $* (the environment is installed before this check)"; }
python() {
  if [ "${1:-}" = "-m" ] && [ "${2:-}" = "pytest" ]; then
    echo "docs-check: not run: python -m pytest (the test suite is its own CI step)"
  else
    command python "$@"
  fi
}
"""


@dataclass
class Command:
    page: str
    line: int
    text: str
    expect_error: Optional[str] = None
    skip: Optional[str] = None
    status: str = "pending"
    seconds: float = 0.0
    detail: str = ""

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def pages(root: Path) -> list[str]:
    """README first, then README's documentation table in order, then any page the table misses."""
    order = ["README.md"]
    for page in TABLE_ROW.findall((root / "README.md").read_text()):
        if page not in order and (root / page).is_file():
            order.append(page)
    order += sorted(p.relative_to(root).as_posix() for p in (root / "docs").glob("*.md")
                    if p.relative_to(root).as_posix() not in order)
    return order


def blocks(text: str) -> list[tuple[str, int, list[str], Optional[str]]]:
    """(language, first line number, lines, skip reason) of every fenced block."""
    out, lines, i, last_text = [], text.splitlines(), 0, ""
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            if lines[i].strip():
                last_text = lines[i]
            i += 1
            continue
        lang, start, body = m.group(1).lower(), i + 2, []
        i += 1
        while i < len(lines) and not FENCE.match(lines[i]):
            body.append(lines[i])
            i += 1
        skip = SKIP.search(last_text)
        out.append((lang, start, body, skip.group(1) if skip else None))
        last_text = ""
        i += 1
    return out


def _gather(lines: list[str], i: int) -> tuple[str, int]:
    """One shell command starting at lines[i]: backslash continuations and heredoc bodies included."""
    text = lines[i]
    while text.rstrip().endswith("\\") and i + 1 < len(lines):
        i += 1
        text += "\n" + lines[i]
    doc = HEREDOC.search(text)
    if doc:
        while i + 1 < len(lines):
            i += 1
            text += "\n" + lines[i]
            if lines[i].strip() == doc.group(2):
                break
    return text, i


def commands(page: str, lang: str, start: int, body: list[str], skip: Optional[str]) -> list[Command]:
    cmds: list[Command] = []
    i = 0
    while i < len(body):
        line = body[i]
        stripped = line.strip()
        if lang == "console":
            if stripped.startswith("$ "):
                body[i] = line.split("$ ", 1)[1]
                text, i = _gather(body, i)
                cmds.append(Command(page, start + i, text, skip=skip))
            elif stripped.startswith("kiln: ") and cmds and cmds[-1].expect_error is None:
                cmds[-1].expect_error = stripped
            i += 1
            continue
        if not stripped:
            i += 1
            continue
        if stripped.startswith("#"):
            m = re.match(r"#\s*(kiln: .*)", stripped)
            if m and cmds and cmds[-1].expect_error is None and body[i - 1].strip() and not body[i - 1].strip().startswith("#"):
                cmds[-1].expect_error = m.group(1)
            i += 1
            continue
        first = i
        text, i = _gather(body, i)
        cmds.append(Command(page, start + first, text, skip=skip))
        i += 1
    return cmds


def extract(root: Path) -> list[Command]:
    out = []
    for page in pages(root):
        for lang, start, body, skip in blocks((root / page).read_text()):
            if lang in RUNNABLE:
                out.extend(commands(page, lang, start, list(body), skip))
    return out


def _matches(expected: str, actual: str) -> bool:
    parts = [p.strip() for p in re.split(r"\(?\.\.\.\)?", expected) if p.strip()]
    return all(p in actual for p in parts)


def run(cmds: list[Command], workdir: Path, env: dict, timeout: float) -> None:
    state = workdir / ".docs-check-env"
    prelude = workdir / ".docs-check-prelude"
    prelude.write_text(PRELUDE)
    state.write_text("")
    for cmd in cmds:
        if cmd.skip:
            cmd.status, cmd.detail = "skipped", cmd.skip
            print(f"--- {cmd.where} skipped ({cmd.skip})", flush=True)
            continue
        print(f"--- {cmd.where} $ {cmd.text}", flush=True)
        script = (f"source {prelude}\nsource {state}\n" + ("" if cmd.expect_error else "set -eo pipefail\n")
                  + cmd.text + f"\nrc=$?\nexport -p > {state}.new && mv {state}.new {state}\nexit $rc\n")
        t0 = time.time()
        try:
            proc = subprocess.run(["bash", "-c", script], cwd=workdir, env=env, capture_output=True, text=True,
                                  timeout=timeout)
            rc, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, out, err = -1, exc.stdout or "", f"timed out after {timeout:.0f}s"
            out = out.decode() if isinstance(out, bytes) else out
        cmd.seconds = time.time() - t0
        sys.stdout.write(_tail(out + err, 25))
        if cmd.expect_error:
            ok = rc == 2 and _matches(cmd.expect_error, err)
            cmd.detail = f"expected exit 2 and {cmd.expect_error!r}; got exit {rc}"
        else:
            ok = rc == 0
            cmd.detail = f"exit {rc}: {_tail(err, 3).strip()}" if not ok else ""
        cmd.status = "ok" if ok else "FAILED"
        print(f"    {cmd.status} in {cmd.seconds:.1f}s", flush=True)


def _tail(text: str, n: int) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return "".join(f"    | {line[:200]}\n" for line in lines[-n:])


def _wait_for_slurm(workdir: Path, env: dict, limit: float = 300) -> None:
    """Jobs the docs submitted run in the clone: let them finish before it is removed."""
    state = (workdir / ".docs-check-env").read_text() if (workdir / ".docs-check-env").is_file() else ""
    if "SLURM_CONF" not in state or not shutil.which("squeue"):
        return
    t0 = time.time()
    while time.time() - t0 < limit:
        q = subprocess.run(["bash", "-c", f"source {workdir / '.docs-check-env'}; squeue -h"], env=env,
                           capture_output=True, text=True)
        if q.returncode != 0 or not q.stdout.strip():
            return
        time.sleep(2)


def report(cmds: list[Command]) -> str:
    lines = ["", "docs check: every command in reading order", ""]
    for c in cmds:
        first = c.text.splitlines()[0][:90]
        lines.append(f"{c.status:8s} {c.seconds:6.1f}s  {c.where:28s} {first}")
        if c.status != "ok" and c.detail:
            lines.append(f"{'':17s}{c.detail[:300]}")
    counts = {s: sum(c.status == s for c in cmds) for s in ("ok", "FAILED", "skipped")}
    lines.append("")
    lines.append(f"{counts['ok']} ok, {counts['FAILED']} failed, {counts['skipped']} skipped (marked illustrative), "
                 f"{sum(c.seconds for c in cmds):.0f}s")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="print the extracted commands and exit")
    ap.add_argument("--workdir", default=None, help="clone into this (empty) directory and keep it "
                                                     "(default: a temporary directory, removed afterwards)")
    ap.add_argument("--source", default=str(REPO), help="repository to clone (default: this one, HEAD)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per command (default 900)")
    ap.add_argument("--overrides", default=os.environ.get("KILN_OVERRIDES", DEFAULT_OVERRIDES),
                    help=f"KILN_OVERRIDES for every command (default: {DEFAULT_OVERRIDES!r})")
    args = ap.parse_args(argv)
    if args.list:
        for c in extract(REPO):
            print(f"{c.where:28s} {'[skip: ' + c.skip + '] ' if c.skip else ''}"
                  f"{'[expects: ' + c.expect_error + '] ' if c.expect_error else ''}{c.text}")
        return 0
    tmp = None
    if args.workdir:
        base = Path(args.workdir).resolve()
    else:
        tmp = tempfile.mkdtemp(prefix="kiln-docs-")
        base = Path(tmp) / "kiln"
    subprocess.run(["git", "clone", "-q", args.source, str(base)], check=True)
    env = {**os.environ, "PYTHONPATH": str(base), "KILN_OVERRIDES": args.overrides,
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    cmds = extract(base)
    try:
        run(cmds, base, env, args.timeout)
    finally:
        _wait_for_slurm(base, env)
        print(report(cmds))
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if any(c.status == "FAILED" for c in cmds) else 0


if __name__ == "__main__":
    sys.exit(main())
