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
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
    set_optimizer_state_dict)

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


def model_state(model_parts: list) -> dict:
    """One flat {fqn: tensor} dict over all model parts held by this rank (names are layout-free)."""
    state = {}
    for part in model_parts:
        state.update(get_model_state_dict(part))
    return state


def optim_state(model_parts: list, optimizers: list) -> dict:
    opts = StateDictOptions(flatten_optimizer_state_dict=True)
    state = {}
    for part, opt in zip(model_parts, optimizers):
        state.update(get_optimizer_state_dict(part, opt, options=opts))
    return state


def load_model_state(model_parts: list, state: dict) -> None:
    for part in model_parts:
        keys = set(get_model_state_dict(part).keys())
        set_model_state_dict(part, {k: v for k, v in state.items() if k in keys})


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

    # ---------- saving ----------
    def save(self, step: int, model_parts: list, optimizers: list, meta: dict, data_state: dict | None,
             dp_rank: int, config_yaml: str, engine=None) -> None:
        """Collective: every rank calls it at the same step. Waits for an earlier async save first.
        With a DeepSpeed `engine`, its own ZeRO files are written (synchronously) in the same layout."""
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
        if engine is not None:
            engine.save_checkpoint(str(self.dir), tag=tmp.name, save_latest=False)
            meta["engine"] = "deepspeed"
            _barrier()
            self._finalize(tmp, final, meta, config_yaml)
            _barrier()
            return
        state = {"model": model_state(model_parts), "optim": optim_state(model_parts, optimizers)}
        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=str(tmp))
            self._pending = (future, tmp, final, meta, config_yaml)
        else:
            dcp.save(state, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
            _barrier()
            self._finalize(tmp, final, meta, config_yaml)
            _barrier()

    def poll(self) -> None:
        """Finish an async save whose writes are done (call once per step; cheap)."""
        if self._pending and self._pending[0].done():
            self.wait()

    def wait(self) -> None:
        if not self._pending:
            return
        future, tmp, final, meta, config_yaml = self._pending
        self._pending = None
        future.result()
        self._finalize(tmp, final, meta, config_yaml)

    def _finalize(self, tmp: Path, final: Path, meta: dict, config_yaml: str) -> None:
        if _rank() != 0:
            return
        (tmp / "config.yaml").write_text(config_yaml)
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
        done = sorted(p for p in self.dir.glob(f"{STEP_PREFIX}*") if p.is_dir() and p.suffix not in (".tmp", ".old"))
        for old in done[:-self.keep_last]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)
        for stray in self.dir.glob(f"{STEP_PREFIX}*.old"):
            shutil.rmtree(stray, ignore_errors=True)

    # ---------- finding and loading ----------
    def find_resumable(self) -> Path | None:
        """The checkpoint `latest` names if it is whole, else the newest whole one before it."""
        return find_resumable(self.dir)

    def load(self, path: Path, model_parts: list, optimizers: list | None, expect_hash: str | None,
             engine=None) -> dict:
        """Collective: restore model (and optimizer) state into this rank's parts; returns meta."""
        meta = check_checkpoint(path)
        if expect_hash and meta.get("config_hash") not in (None, expect_hash):
            raise KilnError(f"checkpoint {path} was saved for a different model shape "
                            f"(config hash {meta.get('config_hash')} != {expect_hash}); see its config.yaml")
        if (meta.get("engine") == "deepspeed") != (engine is not None):
            raise KilnError(f"checkpoint {path} was saved by the {meta.get('engine', 'native')} engine and this run "
                            f"uses the {'deepspeed' if engine is not None else 'native'} engine; convert it first: "
                            f"kiln convert {path} --to kiln --out NEW_DIR")
        if engine is not None:
            _load_deepspeed(engine, path, with_optimizer=bool(optimizers))
            _restore_rng(meta)
            return meta
        from kiln.checkpoint.kiln_format import SafeFileSystemReader

        if meta.get("model_only"):  # imported weights (kiln convert): the optimizer starts fresh
            optimizers = None
        state: dict = {"model": model_state(model_parts)}
        if optimizers:
            state["optim"] = optim_state(model_parts, optimizers)
        # DCP's .metadata is a pickle: read it with an unpickler that admits only DCP's own classes.
        dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), no_dist=not dist.is_initialized())
        load_model_state(model_parts, state["model"])
        if optimizers:
            opts = StateDictOptions(flatten_optimizer_state_dict=True)
            for part, opt in zip(model_parts, optimizers):
                set_optimizer_state_dict(part, opt, state["optim"], options=opts)
        _restore_rng(meta)
        return meta


def _restore_rng(meta: dict) -> None:
    rng = meta.get("rng") or []
    if rng:
        _set_rng_state(rng[_rank() % len(rng)])


def _load_deepspeed(engine, path: Path, with_optimizer: bool) -> None:
    """DeepSpeed's loader unpickles freely, so every file is first proven to hold only tensors,
    plain data and DeepSpeed's few own classes (torch's weights-only unpickler)."""
    from kiln.checkpoint.deepspeed_format import screen

    for f in sorted(Path(path).glob("*.pt")):
        screen(f)
    load_path, _ = engine.load_checkpoint(str(Path(path).parent), tag=Path(path).name,
                                          load_optimizer_states=with_optimizer, load_lr_scheduler_states=False)
    if load_path is None:
        raise KilnError(f"checkpoint {path}: DeepSpeed could not load it")


def check_checkpoint(path: Path) -> dict:
    """Refuse a checkpoint with missing or truncated parts; return its meta."""
    meta_path = Path(path) / META
    if not meta_path.is_file():
        raise KilnError(f"checkpoint {path} is incomplete: no {META} (a save was interrupted?)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise KilnError(f"checkpoint {meta_path} is corrupt: {exc}") from None
    for name, size in meta.get("files", {}).items():
        f = Path(path) / name
        if not f.is_file():
            raise KilnError(f"checkpoint {path} is missing part {name}")
        if f.stat().st_size != size:
            raise KilnError(f"checkpoint {path} part {name} is truncated or changed "
                            f"({f.stat().st_size} bytes, expected {size})")
    return meta


def find_resumable(ckpt_dir: Path) -> Path | None:
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / "latest"
    candidates = sorted((p for p in ckpt_dir.glob(f"{STEP_PREFIX}*")
                         if p.is_dir() and p.suffix not in (".tmp", ".old")), reverse=True)
    if latest.is_file():
        named = ckpt_dir / latest.read_text().strip()
        if not named.exists() and named.with_name(named.name + ".old").is_dir():
            named = named.with_name(named.name + ".old")  # a crash between re-save's two renames
        candidates = [named] + [c for c in candidates if c.name < named.name]
    for cand in candidates:
        try:
            check_checkpoint(cand)
            return cand
        except KilnError as exc:
            log.warning("skipping checkpoint: %s", exc)
    return None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
