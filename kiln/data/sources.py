"""Input discovery and document reading for `kiln data prepare`.

Inputs are files, directories (every file below, sorted), globs (sorted matches) or the word
`stdlib` (this Python's standard-library `.py` sources, a text corpus present on every machine).
`.jsonl` files hold one document per line in a text field, `.parquet` files one per row of a text
column, anything else is one plain-text document per file. Order is deterministic: inputs in the
order given, files sorted within each. Text that is not valid UTF-8 is decoded with U+FFFD
replacement characters and counted, never dropped silently.
"""
from __future__ import annotations

import glob
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from kiln.errors import KilnError

SKIP_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


@dataclass
class Document:
    text: str
    source: str
    bad_utf8: bool = False


def stdlib_files() -> list[Path]:
    """The standard library's .py files (no tests, no installed packages), sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in root.rglob("*.py") if not SKIP_STDLIB_DIRS & set(f.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Resolve files, directories, globs and `stdlib` into an ordered, duplicate-free file list."""
    if not inputs:
        raise KilnError("data prepare: no inputs given")
    files: list[Path] = []
    for item in inputs:
        if item == "stdlib":
            found = stdlib_files()
        elif Path(item).is_dir():
            found = sorted(p for p in Path(item).rglob("*") if p.is_file())
        elif Path(item).is_file():
            found = [Path(item)]
        else:
            found = [Path(p) for p in sorted(glob.glob(item, recursive=True)) if Path(p).is_file()]
        if not found:
            raise KilnError(f"data prepare: input {item!r} matches no files")
        files.extend(found)
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _decode(raw: bytes) -> tuple[str, bool]:
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def read_documents(files: list[Path], text_field: str = "text", max_bytes: Optional[int] = None) -> Iterator[Document]:
    """Yield documents in order; stop after the document that reaches `max_bytes` of UTF-8 text."""
    total = 0
    for path in files:
        for doc in _file_documents(path, text_field):
            if not doc.text:
                continue
            yield doc
            total += len(doc.text.encode("utf-8"))
            if max_bytes is not None and total >= max_bytes:
                return


def _file_documents(path: Path, text_field: str) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                line, bad = _decode(raw)
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise KilnError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise KilnError(f"{path}:{lineno}: no string field {text_field!r} "
                                    f"(set the text field with --text-field)")
                yield Document(text, f"{path}:{lineno}", bad)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:
            raise KilnError(f"{path}: cannot read parquet ({exc})") from None
        if text_field not in pf.schema_arrow.names:
            raise KilnError(f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
        row = 0
        for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
            for text in batch.column(0).to_pylist():
                row += 1
                if isinstance(text, bytes):
                    text, bad = _decode(text)
                    yield Document(text, f"{path}#{row}", bad)
                elif text is not None:
                    yield Document(str(text), f"{path}#{row}")
    else:
        text, bad = _decode(path.read_bytes())
        yield Document(text, str(path), bad)
