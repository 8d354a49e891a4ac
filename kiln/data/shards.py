"""Webdataset tar shards of fixed-size token samples, and the manifest that describes them.

A sample is one tar member `<split>-<index>.tokens`: `sample_tokens` little-endian integers of the
manifest's dtype. Tar headers carry fixed metadata (mtime 0, fixed owner and mode) so the same
inputs give byte-identical shards. The reader checks a shard once, when a loader is built:
existence, size, a `tarfile` walk that yields each sample's byte offset for direct reads, and
(where the loader asks) sha256.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from kiln.errors import KilnError

MANIFEST = "manifest.json"
FORMAT = "kiln-token-shards"
FORMAT_VERSION = 1
log = logging.getLogger("kiln.data")


def dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


class ShardWriter:
    """Cuts a split's token stream into fixed-size samples and rolls tar shards every `samples_per_shard`."""

    def __init__(self, out_dir: Path, split: str, sample_tokens: int, samples_per_shard: int, dtype: str):
        self.out_dir, self.split = Path(out_dir), split
        self.sample_tokens, self.samples_per_shard = sample_tokens, samples_per_shard
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.pending: list[np.ndarray] = []
        self.pending_len = 0
        self.shards: list[dict] = []
        self.samples = 0
        self._writer = None
        self._file = None
        self._in_shard = 0
        self._max_id = 0  # the largest token id in the open shard: readers check it against the model's vocab

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.pending_len += len(tokens)
        if self.pending_len >= self.sample_tokens:
            stream = np.concatenate(self.pending)
            n = len(stream) // self.sample_tokens
            for i in range(n):
                self._write_sample(stream[i * self.sample_tokens:(i + 1) * self.sample_tokens])
            rest = stream[n * self.sample_tokens:]
            self.pending, self.pending_len = [rest], len(rest)

    def _write_sample(self, sample: np.ndarray) -> None:
        import webdataset as wds

        if self._writer is None:
            name = f"{self.split}-{len(self.shards):06d}.tar"
            self._file = open(self.out_dir / name, "wb")
            self._writer = wds.TarWriter(self._file, user="kiln", group="kiln", mode=0o444, mtime=0,
                                         encoder=False, format=tarfile.USTAR_FORMAT)
            self.shards.append({"name": name})
            self._in_shard = self._max_id = 0
        key = f"{self.split}-{self.samples:09d}"
        self._writer.write({"__key__": key, "tokens": sample.astype(self.dtype).tobytes()})
        self._max_id = max(self._max_id, int(sample.max()))
        self.samples += 1
        self._in_shard += 1
        if self._in_shard == self.samples_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        self._writer.close()  # also closes the file object
        entry = self.shards[-1]
        path = self.out_dir / entry["name"]
        entry.update(samples=self._in_shard, tokens=self._in_shard * self.sample_tokens,
                     bytes=path.stat().st_size, sha256=file_sha256(path), max_token_id=self._max_id)
        self._writer = self._file = None

    def finish(self) -> dict:
        """Close the last shard; the tail shorter than one sample is dropped (and counted)."""
        if self._writer is not None:
            self._close_shard()
        return {"shards": self.shards, "samples": self.samples, "tokens": self.samples * self.sample_tokens,
                "dropped_tokens": self.pending_len}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise KilnError(f"{data_dir}: no {MANIFEST} (run `kiln data prepare ... --out {data_dir}` first)")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise KilnError(f"{path}: not valid JSON ({type(exc).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise KilnError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} manifest")
    check_manifest(manifest, path)
    return manifest


_INT = (int,)
_MANIFEST_KEYS = {"vocab_size": _INT, "sample_tokens": _INT, "dtype": (str,), "tokenizer": (dict,), "splits": (dict,)}
_TOKENIZER_KEYS = {"name": (str,), "eos_id": _INT, "sha256": (str,)}
_SHARD_KEYS = {"name": (str,), "samples": _INT, "tokens": _INT, "bytes": _INT, "sha256": (str,)}


def _need(obj: dict, keys: dict, where: str) -> None:
    for key, kinds in keys.items():
        value = obj.get(key)
        if not isinstance(value, kinds) or isinstance(value, bool):
            got = "missing" if key not in obj else f"a {type(value).__name__}"
            raise KilnError(f"{where}: {key} is {got}, expected {' or '.join(k.__name__ for k in kinds)}")


def check_manifest(m: dict, path: Path) -> None:
    """Every field the reader uses, with its type and range: one line naming the culprit, never a KeyError."""
    _need(m, _MANIFEST_KEYS, str(path))
    _need(m["tokenizer"], _TOKENIZER_KEYS, f"{path}: tokenizer")
    if m["dtype"] not in ("uint16", "uint32"):
        raise KilnError(f"{path}: dtype {m['dtype'][:20]!r} is not uint16 or uint32")
    if m["vocab_size"] < 1 or m["sample_tokens"] < 1:
        raise KilnError(f"{path}: vocab_size and sample_tokens must be positive")
    if not 0 <= m["tokenizer"]["eos_id"] < m["vocab_size"]:
        raise KilnError(f"{path}: tokenizer.eos_id {m['tokenizer']['eos_id']} is not below vocab_size {m['vocab_size']}")
    for split, body in m["splits"].items():
        shards = body.get("shards") if isinstance(body, dict) else None
        if not isinstance(shards, list):
            raise KilnError(f"{path}: splits.{split}.shards is missing or not a list")
        for i, entry in enumerate(shards):
            where = f"{path}: splits.{split}.shards.{i}"
            if not isinstance(entry, dict):
                raise KilnError(f"{where} is not an object")
            _need(entry, _SHARD_KEYS, where)
            name = entry["name"]
            if Path(name).name != name or name in (".", "..") or not name.endswith(".tar"):
                raise KilnError(f"{where}: name {name[:60]!r} is not a .tar file inside {path.parent}")
            if min(entry["samples"], entry["tokens"], entry["bytes"]) < 0:
                raise KilnError(f"{where}: negative count")
            top = entry.get("max_token_id")
            if top is not None and (not isinstance(top, int) or not 0 <= top < m["vocab_size"]):
                raise KilnError(f"{where} ({name}): max_token_id {top} is not below the manifest's "
                                f"vocab_size {m['vocab_size']}")


def write_manifest(data_dir: Path, manifest: dict) -> None:
    tmp = Path(data_dir) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, Path(data_dir) / MANIFEST)


@dataclass
class ShardIndex:
    """A verified shard: where each sample's tokens start in the file."""

    path: str
    offsets: np.ndarray  # int64 byte offset of each sample's data


def index_shard(data_dir: str | os.PathLike, entry: dict, sample_bytes: int, check_sha256: bool = True) -> ShardIndex:
    """Check a shard against its manifest entry and index it.

    Always: it exists and has the manifest's size. With `check_sha256` the whole file is hashed (the
    only check that sees flipped token bytes) and a `tarfile` walk finds the manifest's sample count,
    each of `sample_bytes`; without it, the fixed layout is checked at its first, second and last
    member (`_layout_offsets`), so startup cost does not grow with the number of samples.
    """
    path = Path(data_dir) / entry["name"]
    where = f"shard {entry['name']} in {data_dir}"
    try:
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise KilnError(f"{where}: {size} bytes, manifest says {entry['bytes']} (truncated or replaced)")
        if not check_sha256:
            return ShardIndex(str(path), _layout_offsets(path, entry["samples"], sample_bytes, size, where))
        if file_sha256(path) != entry["sha256"]:
            raise KilnError(f"{where}: sha256 mismatch (corrupt)")
        offsets = []
        with open(path, "rb", buffering=0) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            for member in tar:
                if not member.name.endswith(".tokens") or member.size != sample_bytes:
                    raise KilnError(f"{where}: unexpected member {member.name} ({member.size} bytes)")
                offsets.append(member.offset_data)
    except FileNotFoundError:
        raise KilnError(f"{where}: missing") from None
    except tarfile.TarError as exc:
        raise KilnError(f"{where}: not a readable tar ({exc})") from None
    except OSError as exc:
        raise KilnError(f"{where}: unreadable ({exc})") from None
    if len(offsets) != entry["samples"]:
        raise KilnError(f"{where}: {len(offsets)} samples, manifest says {entry['samples']}")
    return ShardIndex(str(path), np.asarray(offsets, dtype=np.int64))


def _layout_offsets(path: Path, samples: int, sample_bytes: int, size: int, where: str) -> np.ndarray:
    """Sample offsets from kiln's fixed shard layout (one USTAR member per sample: a 512-byte header,
    then the tokens padded to 512), checking the first, second and last headers: O(1) reads where a
    tar walk is O(samples). Shards this rank does not hash get this check; the rank that hashes a
    shard walks every header."""
    stride = 512 + -(-sample_bytes // 512) * 512
    if samples * stride + 1024 > size:
        raise KilnError(f"{where}: {size} bytes cannot hold {samples} samples (truncated?)")
    with open(path, "rb", buffering=0) as raw:
        for i in sorted({0, min(1, samples - 1), samples - 1}):
            raw.seek(i * stride)
            try:
                info = tarfile.TarInfo.frombuf(raw.read(512), tarfile.ENCODING, "surrogateescape")
            except tarfile.HeaderError as exc:
                raise KilnError(f"{where}: not a readable tar (sample {i}: {exc})") from None
            if not info.name.endswith(".tokens") or info.size != sample_bytes:
                raise KilnError(f"{where}: unexpected member {info.name} ({info.size} bytes)")
    return 512 + stride * np.arange(samples, dtype=np.int64)


def index_shards(data_dir: str, entries: list[dict], sample_bytes: int, on_bad: str,
                 check_sha256: Optional[list[bool]] = None) -> list[Optional[ShardIndex]]:
    """Index shards (sha256 where `check_sha256` says, default all); with on_bad='skip' a bad shard
    becomes None and is logged, else its error is raised."""
    out: list[Optional[ShardIndex]] = []
    bad = []
    for i, entry in enumerate(entries):
        try:
            out.append(index_shard(data_dir, entry, sample_bytes, check_sha256 is None or check_sha256[i]))
        except KilnError as exc:
            if on_bad != "skip":
                raise
            log.warning("skipping %s", exc)
            bad.append(entry["name"])
            out.append(None)
    if bad:
        log.warning("data: skipped %d bad shard(s) of %d in %s: %s", len(bad), len(entries), data_dir, ", ".join(bad))
    return out
