"""Per-file checksums for checkpoints: computed where the data is written, verified before loading.

A flipped bit in a tensor file loads without complaint (it is still a valid float). So every rank
hashes the files it has just written (in DCP's writer, which runs on the async-save thread when
saving asynchronously, while the data is still in the page cache) and leaves the sums in a small
sidecar; rank 0 folds the sidecars and the files it wrote itself into `meta.json["sha256"]`.
Loading verifies them, spread over the ranks, before a single byte is used.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from torch.distributed.checkpoint.filesystem import FileSystemWriter

SIDECAR_SUFFIX = ".sha256.json"
_CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class ChecksummedWriter(FileSystemWriter):
    """DCP's filesystem writer that also writes `<rank prefix>.sha256.json` with the sums of its files.

    `write_data` returns only after the sidecar is on disk, and the coordinator writes `.metadata`
    only after every rank's `write_data` returned, so a finished save always has all sidecars."""

    def write_data(self, plan, planner):
        future = super().write_data(plan, planner)
        results = future.wait()
        names = sorted({wr.storage_data.relative_path for wr in results})
        sums = {name: sha256_file(Path(self.path) / name) for name in names}
        prefix = getattr(plan.storage_data, "prefix", "__0_")
        (Path(self.path) / f"{prefix}{SIDECAR_SUFFIX}").write_text(json.dumps(sums))
        return future


def collect_sums(directory: Path) -> dict[str, str]:
    """Every file's sha256: the ranks' sidecars (removed once folded in), the rest hashed here."""
    sums: dict[str, str] = {}
    for sidecar in sorted(directory.glob(f"*{SIDECAR_SUFFIX}")):
        sums.update(json.loads(sidecar.read_text()))
        sidecar.unlink()
    for f in sorted(directory.iterdir()):
        if f.is_file() and f.name not in sums:
            sums[f.name] = sha256_file(f)
    return sums
