"""Streaming, packed, resumable batches from `kiln data prepare` shards.

The order of tokens a rank sees is a pure function of (manifest, split, seed, dp_rank, dp_size):

* Rank slice. The split's samples, in manifest order, are cut into `dp_size` contiguous, disjoint
  slices (sizes differ by at most one sample): each sample belongs to exactly one rank. A rank
  reads only the shards its slice touches, and verifies them (sha256 + tar walk) when built.
* Epoch order (train). Per epoch e, the slice's shard segments are permuted by (seed, e), then
  samples are permuted inside consecutive blocks of `shuffle_buffer` samples. Validation keeps
  manifest order.
* Packing. The epoch orders, concatenated epoch after epoch, form one endless token stream per
  rank; window w is tokens [w*(S+1), (w+1)*(S+1)), input = window[:-1], target = window[1:].
  Windows cross document and sample boundaries; an epoch's tail flows into the next epoch, so
  every token is used exactly once per epoch.
* Mixtures. Output window g of a rank is drawn from dataset d with probability weight_d, by an
  RNG keyed on (seed, rank, g // 1024): the choice sequence does not depend on batch size or workers.

DataLoader workers only parallelise reading: worker w builds batches k = w, w+W, w+2W, ... and
torch's DataLoader returns them round-robin, i.e. in order. The loader state is therefore just
"windows yielded" plus "windows consumed per dataset", and resuming with any worker count (or
none) continues the identical batch sequence.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch
import torch.utils.data as tud

from kiln.data.shards import index_shards, read_manifest
from kiln.errors import KilnError

log = logging.getLogger("kiln.data")
CHOICE_CHUNK = 1024
STATE_VERSION = 1


@dataclass
class _Source:
    """One dataset's split as one rank sees it: the rank's samples in canonical order."""

    name: str
    dtype: np.dtype
    sample_tokens: int
    eos_id: int
    paths: list[str]
    shard_of: np.ndarray  # shard index of each sample in the slice
    offset_of: np.ndarray  # byte offset of each sample's tokens in its shard
    global_id: np.ndarray  # position in the split's full sample list (for boundary detection)
    salt: int
    _orders: dict = field(default_factory=dict, repr=False)
    _fds: dict = field(default_factory=dict, repr=False)
    _pid: int = 0

    @property
    def epoch_tokens(self) -> int:
        return len(self.shard_of) * self.sample_tokens

    def order(self, epoch: int, shuffle: bool, seed: int, rank: int, buffer: int) -> np.ndarray:
        """Sample positions of one epoch: segments permuted, then samples permuted within buffer blocks."""
        if not shuffle:
            return np.arange(len(self.shard_of))
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.pop(min(self._orders))
            rng = np.random.default_rng([seed, self.salt, rank, epoch])
            n = len(self.shard_of)
            starts = np.flatnonzero(np.r_[True, self.shard_of[1:] != self.shard_of[:-1]])
            ends = np.r_[starts[1:], n]
            perm = rng.permutation(len(starts))
            order = np.concatenate([np.arange(starts[i], ends[i]) for i in perm])
            if buffer > 1:
                keys = np.arange(n) // buffer + rng.random(n)
                order = order[np.argsort(keys, kind="stable")]
            self._orders[epoch] = order
        return self._orders[epoch]

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # opened per process: never share descriptors across fork
            self._fds, self._pid = {}, os.getpid()
        if shard not in self._fds:
            try:
                self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
            except OSError as exc:
                raise KilnError(f"shard {self.paths[shard]}: cannot open ({exc.strerror})") from None
        return self._fds[shard]

    def read(self, start: int, end: int, order_fn) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [start, end) of the rank's endless stream, and a mask of positions where the text is
        not the continuation of the previous token (a sample whose predecessor in the file differs)."""
        L, item = self.sample_tokens, self.dtype.itemsize
        E = self.epoch_tokens
        out = np.empty(end - start, dtype=self.dtype)
        cut = np.zeros(end - start, dtype=bool)
        pos, prev = start, None
        while pos < end:
            epoch, o = divmod(pos, E)
            order = order_fn(epoch)
            o_end = min(E, o + end - pos)
            for p in range(o // L, (o_end - 1) // L + 1):
                idx = order[p]
                lo, hi = max(o, p * L), min(o_end, (p + 1) * L)
                dst = pos - start + lo - o
                gid = self.global_id[idx]
                if lo == p * L and prev is not None and gid != prev + 1:
                    cut[dst] = True
                prev = gid
                nbytes = (hi - lo) * item
                raw = os.pread(self._fd(self.shard_of[idx]), nbytes, int(self.offset_of[idx]) + (lo - p * L) * item)
                if len(raw) != nbytes:
                    raise KilnError(f"shard {self.paths[self.shard_of[idx]]}: short read (truncated since it was verified)")
                out[dst:dst + hi - lo] = np.frombuffer(raw, dtype=self.dtype)
            pos += o_end - o
        return out, cut


def _dataset_entries(data_cfg) -> list[tuple[str, float]]:
    if data_cfg.mixture:
        entries = []
        for i, item in enumerate(data_cfg.mixture):
            get = item.get if isinstance(item, dict) else (lambda k, d=None, it=item: getattr(it, k, d))
            path, weight = get("path"), float(get("weight", 1.0))
            if not path or path == "???":
                raise KilnError(f"config error: data.mixture.{i}.path: missing")
            if not weight > 0:
                raise KilnError(f"config error: data.mixture.{i}.weight: must be positive, got {weight}")
            entries.append((str(path), weight))
        return entries
    if not data_cfg.path:
        raise KilnError("config error: data.path: not set (a `kiln data prepare` output directory)")
    return [(str(data_cfg.path), 1.0)]


def _rank_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    return n * rank // size, n * (rank + 1) // size


def _load_source(path: str, salt: int, split: str, vocab_size: int, dp_rank: int, dp_size: int,
                 on_bad: str) -> tuple[_Source, dict, int]:
    manifest = read_manifest(path)
    where = f"{path}/manifest.json"
    if manifest["vocab_size"] > vocab_size:
        raise KilnError(f"{where}: tokenizer {manifest['tokenizer']['name']} has vocab_size "
                        f"{manifest['vocab_size']} > model.vocab_size={vocab_size}")
    entries = manifest["splits"].get(split, {}).get("shards", [])
    counts = np.array([e["samples"] for e in entries], dtype=np.int64)
    total = int(counts.sum())
    if total < dp_size:
        raise KilnError(f"{where}: split {split!r} has {total} sample(s), fewer than dp_size={dp_size} ranks; "
                        f"prepare more data or lower sample_tokens")
    lo, hi = _rank_bounds(total, dp_rank, dp_size)
    first = np.r_[0, np.cumsum(counts)]
    touched = [i for i in range(len(entries)) if first[i] < hi and first[i + 1] > lo]
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    sample_bytes = manifest["sample_tokens"] * dtype.itemsize
    indexes = index_shards(path, [entries[i] for i in touched], sample_bytes, on_bad)
    shard_of, offset_of, global_id, paths = [], [], [], []
    for i, index in zip(touched, indexes):
        if index is None:
            continue
        a, b = max(lo, first[i]), min(hi, first[i + 1])
        paths.append(index.path)
        shard_of.append(np.full(b - a, len(paths) - 1, dtype=np.int32))
        offset_of.append(index.offsets[a - first[i]:b - first[i]])
        global_id.append(np.arange(a, b, dtype=np.int64))
    if not paths:
        raise KilnError(f"{where}: no readable {split} shards for dp_rank {dp_rank}")
    src = _Source(path, dtype, manifest["sample_tokens"], manifest["tokenizer"]["eos_id"], paths,
                  np.concatenate(shard_of), np.concatenate(offset_of), np.concatenate(global_id), salt)
    # Fewest tokens any rank holds (nominal, before skips): validation gives every rank equal batches.
    min_tokens = min(_rank_bounds(total, r, dp_size)[1] - _rank_bounds(total, r, dp_size)[0]
                     for r in range(dp_size)) * manifest["sample_tokens"]
    return src, manifest, min(min_tokens, src.epoch_tokens)


class _Stream:
    """Everything a worker needs to build batches; picklable, no open files until first read."""

    def __init__(self, sources, weights, split, seq_len, micro_batch, seed, shuffle_buffer, dp_rank,
                 document_mask, val_batches):
        self.sources, self.split = sources, split
        self.weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.seq_len, self.micro_batch, self.seed = seq_len, micro_batch, seed
        self.shuffle_buffer, self.dp_rank, self.document_mask = shuffle_buffer, dp_rank, document_mask
        self.val_batches = val_batches  # per source, validation only
        self._chunk: tuple[int, Optional[np.ndarray]] = (-1, None)

    def choices(self, g: int, n: int) -> np.ndarray:
        """Dataset index of output windows g..g+n (train)."""
        if len(self.sources) == 1:
            return np.zeros(n, dtype=np.int64)
        out = np.empty(n, dtype=np.int64)
        for i in range(n):
            c, j = divmod(g + i, CHOICE_CHUNK)
            if self._chunk[0] != c:
                rng = np.random.default_rng([self.seed, 0x6D6978, self.dp_rank, c])
                self._chunk = (c, rng.choice(len(self.sources), size=CHOICE_CHUNK, p=self.weights))
            out[i] = self._chunk[1][j]
        return out

    def plan(self, state: dict) -> Iterator[tuple[np.ndarray, list[int], dict]]:
        """Endless (train) or finite (val) sequence of (choices, windows consumed before, next state)."""
        B = self.micro_batch
        if self.split == "train":
            g, consumed = state["windows"], list(state["consumed"])
            while True:
                ch = self.choices(g, B)
                before = list(consumed)
                for d in range(len(self.sources)):
                    consumed[d] += int(np.count_nonzero(ch == d))
                g += B
                yield ch, before, {"windows": g, "consumed": list(consumed)}
        else:
            k = 0
            for d, n in enumerate(self.val_batches):
                for j in range(n):
                    if k >= state["batches"]:
                        before = [0] * len(self.sources)
                        before[d] = j * B
                        yield np.full(B, d, dtype=np.int64), before, {"batches": k + 1}
                    k += 1

    def read_batch(self, ch: np.ndarray, before: list[int]) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """The batch's windows in the storage dtype (compact: this is what crosses the process boundary),
        and, with document_mask, where a new document starts."""
        S1 = self.seq_len + 1
        rows = np.empty((len(ch), S1), dtype=self.sources[0].dtype)
        starts = np.zeros((len(ch), S1), dtype=bool) if self.document_mask else None
        for d, src in enumerate(self.sources):
            mask = ch == d
            n = int(np.count_nonzero(mask))
            if not n:
                continue
            order_fn = lambda e, s=src: s.order(e, self.split == "train", self.seed, self.dp_rank, self.shuffle_buffer)
            tokens, cut = src.read(before[d] * S1, (before[d] + n) * S1, order_fn)
            tokens = tokens.reshape(n, S1)
            rows[mask] = tokens
            if starts is not None:
                cut = cut.reshape(n, S1)
                cut[:, 1:] |= tokens[:, :-1] == src.eos_id
                starts[mask] = cut
        return rows, starts

    def batches(self, state: dict, worker: int, num_workers: int) -> Iterator[tuple]:
        for k, (ch, before, _) in enumerate(self.plan(state)):
            if k % num_workers == worker:
                yield self.read_batch(ch, before)


def _to_tensors(packed: tuple[np.ndarray, Optional[np.ndarray]]) -> dict:
    rows, starts = packed
    window = torch.from_numpy(rows.astype(np.int64))
    batch = {"input": window[:, :-1].contiguous(), "target": window[:, 1:].contiguous()}
    if starts is not None:
        starts[:, 0] = False
        batch["doc_ids"] = torch.from_numpy(np.cumsum(starts[:, :-1], axis=1))
    return batch


def _as_is(item):
    return item  # keep numpy: a pickled compact array is cheaper than a shared-memory int64 tensor


class _Workers(tud.IterableDataset):
    """Each DataLoader worker builds every num_workers-th batch; torch returns them round-robin, in order."""

    def __init__(self, stream: _Stream, state: dict):
        self.stream, self.state = stream, state

    def __iter__(self):
        info = tud.get_worker_info()
        if info is None:
            return self.stream.batches(self.state, 0, 1)
        return self.stream.batches(self.state, info.id, info.num_workers)


class TokenLoader:
    """Iterate for batches {"input", "target"[, "doc_ids"]}; state_dict() is the position after the last one."""

    def __init__(self, stream: _Stream, num_workers: int, meta: dict):
        self.stream, self.num_workers, self.meta = stream, num_workers, meta
        self._state = self._initial_state()

    @staticmethod
    def remap_state(states: dict, dp_rank: int, dp_size: int) -> dict:
        """Saved states of every old DP rank -> this rank's state under a new DP size."""
        return remap_data_state(states, dp_rank, dp_size)

    def _initial_state(self) -> dict:
        if self.stream.split == "train":
            return {"windows": 0, "consumed": [0] * len(self.stream.sources)}
        return {"batches": 0}

    def __len__(self) -> int:
        if self.stream.split == "train":
            raise TypeError("the train loader is endless")
        return sum(self.stream.val_batches)

    def __iter__(self) -> Iterator[dict]:
        start = dict(self._state)
        if self.stream.split != "train":
            start = {"batches": 0}  # validation: every pass starts from the beginning
        plan = self.stream.plan(start)
        if self.num_workers == 0:
            source = self.stream.batches(start, 0, 1)
        else:
            source = iter(tud.DataLoader(_Workers(self.stream, start), batch_size=None, collate_fn=_as_is,
                                         num_workers=self.num_workers, prefetch_factor=4))
        for packed in source:
            batch = _to_tensors(packed)
            _, _, self._state = next(plan)
            yield batch

    def state_dict(self) -> dict:
        state = {"version": STATE_VERSION, "split": self.stream.split, **self.meta, **self._state}
        if self.stream.split == "train":
            state["epochs"] = [
                (c * (self.stream.seq_len + 1)) // max(s.epoch_tokens, 1)
                for c, s in zip(self._state["consumed"], self.stream.sources)]
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION or state.get("split") != self.stream.split:
            raise KilnError(f"data loader state: expected a v{STATE_VERSION} {self.stream.split} state")
        if len(state.get("datasets", [])) != len(self.meta["datasets"]):
            raise KilnError(f"data loader state: {len(state.get('datasets', []))} dataset(s) saved, "
                            f"{len(self.meta['datasets'])} configured; cannot resume the same data order")
        for key in ("seq_len",):
            if state.get(key) != self.meta[key]:
                raise KilnError(f"data loader state: {key} was {state.get(key)!r}, now {self.meta[key]!r}; "
                                f"cannot resume the same data order")
        for key in ("dp_size", "micro_batch", "seed", "datasets"):
            if state.get(key) != self.meta[key]:
                log.warning("data loader state: %s changed %s -> %s; the data order after resume differs "
                            "from an uninterrupted run", key, state.get(key), self.meta[key])
        if self.stream.split == "train":
            self._state = {"windows": int(state["windows"]), "consumed": [int(c) for c in state["consumed"]]}
        else:
            self._state = {"batches": int(state["batches"])}


def remap_data_state(states: dict, dp_rank: int, dp_size: int) -> dict:
    """Map train states saved under another DP size onto `dp_rank` of `dp_size`.

    Rank slices change with the DP size, so no exact continuation exists; this keeps each dataset's
    epoch progress: the windows all old ranks consumed are split evenly over the new ranks.
    """
    old = [states[k] for k in sorted(states, key=int)]
    if not old or any(s.get("split") != "train" for s in old):
        raise KilnError("data loader state: expected the saved train states of every old rank")
    new = dict(old[0])
    new["consumed"] = [sum(s["consumed"][d] for s in old) // dp_size for d in range(len(old[0]["consumed"]))]
    new["windows"] = sum(s["windows"] for s in old) // dp_size
    new.update(dp_rank=dp_rank, dp_size=dp_size)
    log.warning("data: resuming %d-rank loader state on %d ranks: epoch progress kept, sample order differs "
                "from an uninterrupted run", len(old), dp_size)
    return new


def build_loader(data_cfg, *, split: str, micro_batch: int, dp_rank: int, dp_size: int,
                 vocab_size: int) -> TokenLoader:
    """A loader for one DP rank. Checks manifests (vocab, tokenizer) and this rank's shards first."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
    entries = _dataset_entries(data_cfg)
    sources, manifests, min_tokens = [], [], []
    for salt, (path, _) in enumerate(entries):
        src, manifest, tokens = _load_source(path, salt, split, vocab_size, dp_rank, dp_size, data_cfg.on_bad_shard)
        sources.append(src)
        manifests.append(manifest)
        min_tokens.append(tokens)
    first = manifests[0]["tokenizer"]
    for (path, _), m in zip(entries[1:], manifests[1:]):
        if m["tokenizer"]["sha256"] != first["sha256"]:
            raise KilnError(f"{path}/manifest.json: tokenizer {m['tokenizer']['name']} differs from "
                            f"{entries[0][0]}'s {first['name']}; a mixture needs one tokenizer")
    S1 = data_cfg.seq_len + 1
    val_batches = [t // S1 // micro_batch for t in min_tokens] if split == "val" else None
    if split == "val" and not sum(val_batches):
        raise KilnError(f"{entries[0][0]}: validation split too small for one batch per rank "
                        f"({min(min_tokens)} tokens < micro_batch*(seq_len+1)={micro_batch * S1}); "
                        f"raise val_fraction or lower micro_batch/seq_len")
    stream = _Stream(sources, [w for _, w in entries], split, data_cfg.seq_len, micro_batch, data_cfg.seed,
                     data_cfg.shuffle_buffer, dp_rank, data_cfg.document_mask, val_batches)
    meta = {"seq_len": data_cfg.seq_len, "micro_batch": micro_batch, "dp_rank": dp_rank, "dp_size": dp_size,
            "seed": data_cfg.seed, "datasets": [p for p, _ in entries]}
    return TokenLoader(stream, data_cfg.num_workers, meta)
