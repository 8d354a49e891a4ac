"""Distributed checkpoints with torch.distributed.checkpoint (DCP): crash-safe and reshardable.

Layout: `<run>/checkpoints/step_XXXXXXXX/` holds the DCP files (app state keys `model`, `optim`),
`meta.json` (step, tokens, data-loader state per DP rank, RNG, config hash, file sizes) and a
copy of `config.yaml`. A save writes into `step_XXXXXXXX.tmp/`; only when every rank's data is
on disk does rank 0 write `meta.json`, rename the directory and atomically replace the
`latest` pointer. A crash mid-save therefore leaves `latest` on the previous good checkpoint.
Loading goes through DCP's resharding, so any parallel layout of the same model can resume.
"""
from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException

from kiln.checkpoint.integrity import ChecksummedWriter, collect_sums, sha256_file
from kiln.checkpoint.safe_load import dcp_load
from kiln.checkpoint.state import Checkpointable, ModelState
from kiln.errors import KilnError

log = logging.getLogger("kiln.checkpoint")
# A single-process run saves without a process group on purpose; DCP warns about it each time.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
STEP_PREFIX = "step_"
META = "meta.json"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_gather(obj: Any) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def drop_tied_duplicates(state: dict) -> dict[str, str]:
    """Remove entries that share storage with an earlier one (tied embeddings: `output.weight` is
    `tok_embeddings.weight`), so a checkpoint stores each tensor once. Returns {dropped: kept}."""
    first: dict[tuple, str] = {}
    aliases = {}
    for name, tensor in list(state.items()):
        if not isinstance(tensor, torch.Tensor):
            continue
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if local.device.type == "meta" or local.numel() == 0:
            continue
        key = (local.data_ptr(), tuple(local.shape), local.stride(), local.dtype)
        if key in first:
            aliases[name] = first[key]
            del state[name]
        else:
            first[key] = name
    return aliases


def restore_tied_duplicates(state: dict, aliases: dict[str, str]) -> None:
    for name, kept in aliases.items():
        state[name] = state[kept]


def _rng_state() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def _set_rng_state(text: str) -> None:
    raw = torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
    torch.set_rng_state(raw.clone())


class CheckpointManager:
    """Saves and finds checkpoints for one run directory. Every rank constructs one."""

    def __init__(self, run_dir: str | Path, keep_last: int = 2, async_save: bool = False):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.async_save = async_save
        self._pending: tuple | None = None  # (future, tmp_dir, final_dir, meta, config_yaml)
        self.rejected: list[str] = []  # why find_resumable skipped each checkpoint it refused

    # ---------- saving ----------
    def save(self, step: int, run: Checkpointable, meta: dict, data_state: dict | None, dp_rank: int,
             config_yaml: str) -> None:
        """Collective: every rank calls it at the same step. Waits for an earlier async save first.
        An engine that keeps its own files (DeepSpeed's ZeRO partitions) writes them synchronously."""
        self.wait()
        final = self.dir / step_dir_name(step)
        tmp = self.dir / (step_dir_name(step) + ".tmp")
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)  # creates checkpoints/ on the first save
        _barrier()
        per_rank = _all_gather({"dp_rank": dp_rank, "data": data_state, "rng": _rng_state()})
        meta = dict(meta, step=step, saved_at=time.time(),
                    data_state={str(r["dp_rank"]): r["data"] for r in per_rank if r["data"] is not None},
                    rng=[r["rng"] for r in per_rank])
        if run.engine_name != "native":
            meta["engine"] = run.engine_name
        state = run.state_dict()
        with self._disk_errors(tmp):
            run.save_files(tmp)
            if not state:
                _barrier()
                self._finalize(tmp, final, meta, config_yaml)
                _barrier()
                return
            drop_tied_duplicates(state["model"])
            if self.async_save:
                future = dcp.async_save(state, storage_writer=ChecksummedWriter(str(tmp)))
                self._pending = (future, tmp, final, meta, config_yaml)
            else:
                dcp.save(state, storage_writer=ChecksummedWriter(str(tmp)), no_dist=not dist.is_initialized())
                _barrier()
                self._finalize(tmp, final, meta, config_yaml)
                _barrier()

    @contextlib.contextmanager
    def _disk_errors(self, tmp: Path):
        """A full or read-only disk: one line naming the directory and the space needed; the
        half-written `.tmp` is removed and `latest` still names the previous good checkpoint."""
        try:
            yield
        except (OSError, CheckpointException) as exc:
            cause = exc
            if isinstance(exc, CheckpointException) and exc.failures:
                cause = next(iter(exc.failures.values()))[0]
            if not isinstance(cause, OSError):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            raise KilnError(f"cannot write checkpoint {tmp.with_suffix('')}: {cause.strerror or cause} "
                            f"({_space_report(self.dir)}); the previous checkpoint is intact") from None

    def poll(self) -> None:
        """Finish an async save whose writes are done (call once per step; cheap)."""
        if self._pending and self._pending[0].done():
            self.wait()

    def wait(self) -> None:
        if not self._pending:
            return
        future, tmp, final, meta, config_yaml = self._pending
        self._pending = None
        with self._disk_errors(tmp):
            future.result()
            self._finalize(tmp, final, meta, config_yaml)

    def _finalize(self, tmp: Path, final: Path, meta: dict, config_yaml: str) -> None:
        if _rank() != 0:
            return
        (tmp / "config.yaml").write_text(config_yaml)
        meta["sha256"] = collect_sums(tmp)
        meta["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        _write_atomic(tmp / META, json.dumps(meta, indent=1))
        old = final.with_name(final.name + ".old")
        if final.exists():  # re-saving a step: keep the complete copy until the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _write_atomic(self.dir / "latest", final.name + "\n")
        shutil.rmtree(old, ignore_errors=True)
        self._prune(keep=final.name)
        log.info("checkpoint saved: %s", final)

    def _prune(self, keep: str) -> None:
        """Drop checkpoints older than the `keep_last` newest up to `keep`; never one newer than `keep`
        (a run that restarted from an earlier step must not delete the later work it did not load)."""
        older = [p for p in _step_dirs(self.dir) if p.name < keep]
        for old in older[:max(len(older) - (self.keep_last - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)
        for stray in self.dir.glob(f"{STEP_PREFIX}*.old"):
            shutil.rmtree(stray, ignore_errors=True)

    def has_checkpoints(self) -> bool:
        return bool(_step_dirs(self.dir)) if self.dir.is_dir() else False

    def clean_stale(self) -> None:
        """Remove what a crashed or failed save left behind (`step_X.tmp`, `latest.tmp`). Rank 0, at start."""
        for stray in list(self.dir.glob(f"{STEP_PREFIX}*.tmp")) + [self.dir / "latest.tmp"]:
            if stray.is_dir():
                shutil.rmtree(stray, ignore_errors=True)
            elif stray.exists():
                stray.unlink()

    # ---------- finding and loading ----------
    def find_resumable(self) -> Path | None:
        """The checkpoint `latest` names if it is whole, else the newest whole one before it. Collective
        under a process group: each rank verifies a share of the files and all agree on the result."""
        self.rejected: list[str] = []
        return find_resumable(self.dir, part=(_rank(), _world()), agree=_all_ok, rejected=self.rejected)

    def load(self, path: Path, run: Checkpointable, expect_hash: str | None, with_optimizer: bool = True) -> dict:
        """Collective: restore a run's state (model, optimizer unless told not to, RNG); returns meta."""
        meta = self._checked_meta(path, expect_hash)
        if meta.get("engine", "native") != run.engine_name:
            raise KilnError(f"checkpoint {path} was saved by the {meta.get('engine', 'native')} engine and this run "
                            f"uses the {run.engine_name} engine; convert it first: "
                            f"kiln convert {path} --to kiln --out NEW_DIR")
        with_optimizer = with_optimizer and not meta.get("model_only")  # imported weights: a fresh optimizer
        run.load_files(path, with_optimizer)
        state = run.state_dict(with_optimizer)
        if state:
            tied = drop_tied_duplicates(state["model"])  # stored once (older checkpoints hold both copies)
            dcp_load(state, path)  # no pickle from the checkpoint is run: see kiln.checkpoint.safe_load
            restore_tied_duplicates(state["model"], tied)
            run.load_state_dict(state)
        _restore_rng(meta)
        return meta

    def load_weights(self, path: Path, model_parts: list, expect_hash: str | None) -> dict:
        """Weights only into plain model parts (`init_from`, generate): no optimizer, no RNG."""
        meta = self._checked_meta(path, expect_hash)
        if meta.get("engine", "native") != "native":
            raise KilnError(f"checkpoint {path} was saved by the {meta['engine']} engine; convert it first: "
                            f"kiln convert {path} --to kiln --out NEW_DIR")
        run = ModelState(model_parts)
        state = run.state_dict(with_optimizer=False)
        tied = drop_tied_duplicates(state["model"])
        dcp_load(state, path)
        restore_tied_duplicates(state["model"], tied)
        run.load_state_dict(state)
        return meta

    @staticmethod
    def _checked_meta(path: Path, expect_hash: str | None) -> dict:
        meta = check_checkpoint(path, part=None)  # sums: verified by find_resumable / resolve_step_dir
        if expect_hash and meta.get("config_hash") not in (None, expect_hash):
            raise KilnError(f"checkpoint {path} was saved for a different model shape "
                            f"(config hash {meta.get('config_hash')} != {expect_hash}); see its config.yaml")
        return meta


def _restore_rng(meta: dict) -> None:
    rng = meta.get("rng") or []
    if rng:
        _set_rng_state(rng[_rank() % len(rng)])


_META_TYPES = {"step": int, "tokens": int, "files": dict, "sha256": dict, "config_hash": str,
               "data_state": dict, "rng": list, "engine": str, "model_only": bool}


def read_meta(path: Path) -> dict:
    """A checkpoint's meta.json, or one line naming what is wrong with it."""
    meta_path = Path(path) / META
    if not meta_path.is_file():
        raise KilnError(f"checkpoint {path} is incomplete: no {META} (a save was interrupted?)")
    try:
        meta = json.loads(meta_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise KilnError(f"checkpoint {meta_path} is corrupt: {type(exc).__name__}") from None
    except OSError as exc:
        raise KilnError(f"checkpoint {meta_path} cannot be read: {exc.strerror or exc}") from None
    if not isinstance(meta, dict):
        raise KilnError(f"checkpoint {meta_path} is corrupt: a JSON {type(meta).__name__}, not an object")
    for key, kind in _META_TYPES.items():
        value = meta.get(key)
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise KilnError(f"checkpoint {meta_path} is corrupt: {key} is a {type(value).__name__}, "
                            f"expected {kind.__name__}")
    for key in ("step", "tokens"):
        if meta.get(key) is not None and meta[key] < 0:
            raise KilnError(f"checkpoint {meta_path} is corrupt: {key} is negative")
    return meta


def check_checkpoint(path: Path, part: tuple[int, int] | None = (0, 1)) -> dict:
    """Refuse a checkpoint with missing, truncated or changed parts; return its meta. Sizes are
    checked for every file; sha256 sums for this rank's share `part=(rank, world)` of them (all of
    them by default; None skips the sums)."""
    path = Path(path)
    meta = read_meta(path)
    files, sums = meta.get("files") or {}, meta.get("sha256") or {}
    for name, size in files.items():
        f = path / name
        if Path(name).name != name or name in (".", ".."):
            raise KilnError(f"checkpoint {path / META} names a part outside its directory: {name!r}")
        if not f.is_file():
            raise KilnError(f"checkpoint {path} is missing part {name}")
        if not isinstance(size, int) or f.stat().st_size != size:
            raise KilnError(f"checkpoint {path} part {name} is truncated or changed "
                            f"({f.stat().st_size} bytes, expected {size})")
    if part is not None:
        rank, world = part
        for name in sorted(sums)[rank::world]:
            f = path / name
            if Path(name).name != name or not f.is_file():
                raise KilnError(f"checkpoint {path} is missing part {name}")
            if sha256_file(f) != sums[name]:
                raise KilnError(f"checkpoint {path} part {name} is damaged (sha256 differs from the one saved)")
    return meta


def _step_dirs(ckpt_dir: Path) -> list[Path]:
    """Finished checkpoint directories, oldest first."""
    return sorted(p for p in Path(ckpt_dir).glob(f"{STEP_PREFIX}*")
                  if p.is_dir() and _STEP_NAME.fullmatch(p.name))


_STEP_NAME = re.compile(re.escape(STEP_PREFIX) + r"\d{8,}")


def read_latest(ckpt_dir: Path) -> Path | None:
    """The checkpoint `latest` names, or None when it is missing or unusable (garbage, binary,
    empty, or a name that leaves the directory): the caller then takes the newest whole one."""
    latest = Path(ckpt_dir) / "latest"
    if not latest.is_file():
        return None
    try:
        name = latest.read_bytes()[:256].decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if not _STEP_NAME.fullmatch(name):
        log.warning("ignoring %s: it does not name a checkpoint (%r); using the newest whole checkpoint",
                    latest, name[:40])
        return None
    named = Path(ckpt_dir) / name
    if not named.exists() and named.with_name(name + ".old").is_dir():
        named = named.with_name(name + ".old")  # a crash between re-save's two renames
    return named


def find_resumable(ckpt_dir: Path, part: tuple[int, int] | None = (0, 1), agree=None,
                   rejected: list[str] | None = None) -> Path | None:
    """The checkpoint `latest` names if it is whole, else the newest whole one before it (or the
    newest whole one at all when `latest` is unusable). `agree(ok)` makes every rank's verdict common;
    why each skipped checkpoint was refused is appended to `rejected`."""
    ckpt_dir = Path(ckpt_dir)
    candidates = _step_dirs(ckpt_dir)[::-1]
    named = read_latest(ckpt_dir)
    if named is not None:
        candidates = [named] + [c for c in candidates if c.name < named.name]
    for cand in candidates:
        try:
            check_checkpoint(cand, part)
            ok, why = True, ""
        except KilnError as exc:
            ok, why = False, str(exc)
        if agree is not None:
            ok = agree(ok)
        if ok:
            return cand
        why = why or f"{cand} failed verification on another rank"
        log.warning("skipping checkpoint: %s", why)
        if rejected is not None:
            rejected.append(why)
    return None


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _all_ok(ok: bool) -> bool:
    """True on every rank only if every rank says True."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([0.0 if ok else 1.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


def _space_report(directory: Path) -> str:
    """Free space where checkpoints go, and how much the last one took."""
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return "free space unknown"
    done = _step_dirs(directory) if directory.is_dir() else []
    last = sum(f.stat().st_size for f in done[-1].iterdir() if f.is_file()) if done else None
    need = f"; the last checkpoint took {last / 2**20:.1f} MiB" if last is not None else ""
    return f"{free / 2**20:.1f} MiB free in {probe}{need}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
