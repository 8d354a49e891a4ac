"""Streaming, packed, resumable batches from `kiln data prepare` shards.

The batches come from one global stream that is a pure function of (manifests, split, seed): the
DP size, the micro-batch and the worker count only decide who reads which part of it.

* Epoch order (train). Per dataset, epoch e of the whole split is its shard segments permuted by
  (seed, e), then samples permuted inside consecutive blocks of `shuffle_buffer` samples.
  Validation keeps manifest order.
* Packing. A dataset's epoch orders, concatenated, form one endless token stream; its window w is
  tokens [w*(S+1), (w+1)*(S+1)), input = window[:-1], target = window[1:]. Windows cross document,
  sample and epoch boundaries; every token is used exactly once per epoch.
* Mixtures. Global window slot j comes from dataset d with probability weight_d, drawn by an RNG
  keyed on (seed, j // 1024), and takes that dataset's next window: its window number is how many
  slots before j chose d. Nothing about ranks or batches enters.
* Ranks. Global batch b is slots [b*B, (b+1)*B) (B = micro_batch); DP rank r of n reads global
  batches r, r+n, r+2n, ... . When the DP group has taken s micro-batches each, slots [0, s*n*B) are
  consumed: for a fixed number of tokens per optimizer step (train.global_batch_tokens), the windows
  of every step are the same whatever n and B are.

The state is therefore global and identical on every rank: W, the slots consumed, and per dataset
the windows those slots took. Any DP size n and micro-batch B with W % (n*B) == 0 continue it
exactly (nothing lost or repeated); otherwise resuming is refused with a KilnError.

Verification, when a loader is built (every rank reads every shard, so every rank must accept the
same shards): each rank checks the size and tar structure of all shards of the split (cheap: the
fixed layout at three headers per shard). With on_bad_shard=fail the sha256 work is partitioned: shard k (counting
through the datasets in config order) is hashed by DP rank k mod n, so the job fails if any shard
is corrupt, at the cost of hashing the data once in total. With on_bad_shard=skip each rank hashes
every shard, so all ranks skip the same ones (each reads the whole split once at start).

DataLoader workers only parallelise reading: worker w builds batches k = w, w+W, w+2W, ... of the
rank's sequence and torch's DataLoader returns them round-robin, i.e. in order, so resuming with
any worker count (or none) continues the identical batch sequence.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch
import torch.utils.data as tud

from kiln.data.shards import index_shards, read_manifest
from kiln.errors import KilnError

log = logging.getLogger("kiln.data")
MAX_OPEN_SHARDS = 64  # per process (reader or worker); least recently used closed first
CHOICE_CHUNK = 1024
STATE_VERSION = 2


@dataclass
class _Source:
    """One dataset's split (all of it, minus skipped shards). Everything here is O(shards), not
    O(samples): every rank and every worker holds it, for the whole split."""

    name: str
    dtype: np.dtype
    sample_tokens: int
    eos_id: int
    paths: list[str]  # kept shards, manifest order
    counts: np.ndarray  # samples in each kept shard
    first_id: np.ndarray  # each kept shard's first sample's position in the split (for boundary detection)
    offsets: list  # per kept shard: (first, stride) when its samples are evenly spaced, else an offsets array
    salt: int
    _segments: dict = field(default_factory=dict, repr=False)
    _blocks: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _fds: dict = field(default_factory=dict, repr=False)
    _pid: int = 0

    @property
    def samples(self) -> int:
        return int(self.counts.sum())

    @property
    def epoch_tokens(self) -> int:
        return self.samples * self.sample_tokens

    def _segment_order(self, epoch: int, shuffle: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Kept shards in the epoch's order, and where each starts in the epoch's sample sequence."""
        key = epoch if shuffle else -1
        if key not in self._segments:
            if len(self._segments) > 3:
                self._segments.pop(min(self._segments))
            perm = (np.random.default_rng([seed, self.salt, epoch]).permutation(len(self.paths)) if shuffle
                    else np.arange(len(self.paths)))
            self._segments[key] = perm, np.r_[0, np.cumsum(self.counts[perm])]
        return self._segments[key]

    def _block(self, epoch: int, block: int, seed: int, buffer: int) -> np.ndarray:
        """The permutation of one shuffle block (built on demand: no whole-epoch order in memory)."""
        key = (epoch, block)
        if key in self._blocks:
            self._blocks.move_to_end(key)
        else:
            if len(self._blocks) >= 64:
                self._blocks.popitem(last=False)
            size = min(buffer, self.samples - block * buffer)
            self._blocks[key] = np.random.default_rng([seed, self.salt, epoch, 0x626C6B, block]).permutation(size)
        return self._blocks[key]

    def locate(self, epoch: int, positions: np.ndarray, shuffle: bool, seed: int,
               buffer: int) -> tuple[np.ndarray, np.ndarray]:
        """(kept shard, sample within it) at these positions of an epoch: shards permuted by
        (seed, epoch), then samples permuted within consecutive blocks of `buffer` positions."""
        q = positions
        if shuffle and buffer > 1:
            q = positions.copy()
            for b in np.unique(positions // buffer):
                m = positions // buffer == b
                q[m] = b * buffer + self._block(epoch, int(b), seed, buffer)[positions[m] - b * buffer]
        perm, starts = self._segment_order(epoch, shuffle, seed)
        seg = np.searchsorted(starts, q, side="right") - 1
        return perm[seg], q - starts[seg]

    def _offset(self, shard: int, local: int) -> int:
        where = self.offsets[shard]
        return where[0] + local * where[1] if isinstance(where, tuple) else int(where[local])

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # opened per process: never share descriptors across fork
            self._fds, self._pid = {}, os.getpid()
        if shard in self._fds:
            self._fds[shard] = self._fds.pop(shard)  # most recently used last
        else:
            if len(self._fds) >= MAX_OPEN_SHARDS:  # a split of 50k shards must not exhaust `ulimit -n`
                os.close(self._fds.pop(next(iter(self._fds))))
            try:
                self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
            except OSError as exc:
                raise KilnError(f"shard {self.paths[shard]}: cannot open ({exc.strerror})") from None
        return self._fds[shard]

    def read(self, start: int, end: int, shuffle: bool, seed: int, buffer: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [start, end) of the dataset's endless stream, and a mask of positions where the text is
        not the continuation of the previous token (a sample whose predecessor in the file differs)."""
        L, item = self.sample_tokens, self.dtype.itemsize
        E = self.epoch_tokens
        out = np.empty(end - start, dtype=self.dtype)
        cut = np.zeros(end - start, dtype=bool)
        pos, prev = start, None
        while pos < end:
            epoch, o = divmod(pos, E)
            o_end = min(E, o + end - pos)
            first = o // L
            shards, locals_ = self.locate(epoch, np.arange(first, (o_end - 1) // L + 1), shuffle, seed, buffer)
            for p, shard, local in zip(range(first, first + len(shards)), shards.tolist(), locals_.tolist()):
                lo, hi = max(o, p * L), min(o_end, (p + 1) * L)
                dst = pos - start + lo - o
                gid = int(self.first_id[shard]) + local
                if lo == p * L and prev is not None and gid != prev + 1:
                    cut[dst] = True
                prev = gid
                nbytes = (hi - lo) * item
                raw = os.pread(self._fd(shard), nbytes, self._offset(shard, local) + (lo - p * L) * item)
                if len(raw) != nbytes:
                    raise KilnError(f"shard {self.paths[shard]}: short read (truncated since it was verified)")
                out[dst:dst + hi - lo] = np.frombuffer(raw, dtype=self.dtype)
            pos += o_end - o
        return out, cut


def _compact(offsets: np.ndarray):
    """(first, stride) for evenly spaced offsets (kiln's shards always are), else the array itself."""
    if len(offsets) > 1 and np.all(np.diff(offsets) == offsets[1] - offsets[0]):
        return int(offsets[0]), int(offsets[1] - offsets[0])
    return (int(offsets[0]), 0) if len(offsets) == 1 else offsets


def _dataset_entries(data_cfg) -> list[tuple[str, float]]:
    """(path, weight) per dataset; kiln.config checked a mixture's paths and weights when it loaded."""
    if data_cfg.mixture:
        return [(str(item.path), float(item.weight)) for item in data_cfg.mixture]
    if not data_cfg.path:
        raise KilnError("config error: data.path: not set (a `kiln data prepare` output directory)")
    return [(str(data_cfg.path), 1.0)]


def _load_source(path: str, salt: int, split: str, vocab_size: int, dp_rank: int, dp_size: int, on_bad: str,
                 first_shard: int) -> tuple[_Source, dict]:
    """Check a dataset's manifest and index its whole split. Shard i is hashed here when on_bad is
    'skip' (every rank must reach the same verdict) or when (first_shard + i) % dp_size == dp_rank."""
    manifest = read_manifest(path)
    where = f"{path}/manifest.json"
    if manifest["vocab_size"] > vocab_size:
        raise KilnError(f"{where}: tokenizer {manifest['tokenizer']['name']} has vocab_size "
                        f"{manifest['vocab_size']} > model.vocab_size={vocab_size}")
    entries = manifest["splits"].get(split, {}).get("shards", [])
    if not sum(e["samples"] for e in entries):
        raise KilnError(f"{where}: split {split!r} has no samples")
    for entry in entries:  # recorded at prepare: an id beyond the embedding is an IndexError (a device assert on GPU)
        if entry.get("max_token_id", -1) >= vocab_size:
            raise KilnError(f"shard {entry['name']} in {path}: token id {entry['max_token_id']} >= "
                            f"model.vocab_size={vocab_size}")
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    hashed = [on_bad == "skip" or (first_shard + i) % dp_size == dp_rank for i in range(len(entries))]
    indexes = index_shards(path, entries, manifest["sample_tokens"] * dtype.itemsize, on_bad, hashed)
    for entry, index, full in zip(entries, indexes, hashed):
        if index is not None and full and "max_token_id" not in entry:  # older manifests: scan what we hashed
            _check_token_ids(index, entry, dtype, manifest["sample_tokens"], vocab_size, path)
    paths, counts, first_id, offsets = [], [], [], []
    first = 0
    for entry, index in zip(entries, indexes):
        if index is not None and entry["samples"]:
            paths.append(index.path)
            counts.append(entry["samples"])
            first_id.append(first)
            offsets.append(_compact(index.offsets))
        first += entry["samples"]
    if not paths:
        raise KilnError(f"{where}: no readable {split} shards (all {len(entries)} skipped)")
    src = _Source(path, dtype, manifest["sample_tokens"], manifest["tokenizer"]["eos_id"], paths,
                  np.asarray(counts, dtype=np.int64), np.asarray(first_id, dtype=np.int64), offsets, salt)
    return src, manifest


def _check_token_ids(index, entry: dict, dtype: np.dtype, sample_tokens: int, vocab_size: int, path: str) -> None:
    data = np.memmap(index.path, dtype=np.uint8, mode="r")
    for offset in index.offsets:
        top = int(np.frombuffer(data, dtype=dtype, count=sample_tokens, offset=int(offset)).max())
        if top >= vocab_size:
            raise KilnError(f"shard {entry['name']} in {path}: token id {top} >= model.vocab_size={vocab_size}")


class _Mixer:
    """The dataset of each global window slot, a pure function of (seed, slot), and how many slots
    of a range chose each dataset (so any rank can find a dataset's position at any slot)."""

    def __init__(self, weights: list[float], seed: int):
        self.p = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.seed = seed
        self._chunks: OrderedDict = OrderedDict()

    def _chunk(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Choices of slots [c*CHUNK, (c+1)*CHUNK) and their running counts per dataset."""
        if c in self._chunks:
            self._chunks.move_to_end(c)
        else:
            if len(self._chunks) >= 16:
                self._chunks.popitem(last=False)
            rng = np.random.default_rng([self.seed, 0x6D6978, c])
            choice = rng.choice(len(self.p), size=CHOICE_CHUNK, p=self.p)
            running = np.zeros((CHOICE_CHUNK + 1, len(self.p)), dtype=np.int64)
            np.cumsum(np.eye(len(self.p), dtype=np.int64)[choice], axis=0, out=running[1:])
            self._chunks[c] = (choice, running)
        return self._chunks[c]

    def _spans(self, a: int, b: int) -> Iterator[tuple[int, int, int]]:
        for c in range(a // CHOICE_CHUNK, (b - 1) // CHOICE_CHUNK + 1 if b > a else a // CHOICE_CHUNK):
            yield c, max(a - c * CHOICE_CHUNK, 0), min(b - c * CHOICE_CHUNK, CHOICE_CHUNK)

    def choices(self, a: int, b: int) -> np.ndarray:
        """Dataset index of slots [a, b)."""
        if len(self.p) == 1:
            return np.zeros(b - a, dtype=np.int64)
        return np.concatenate([self._chunk(c)[0][lo:hi] for c, lo, hi in self._spans(a, b)])

    def counts(self, a: int, b: int) -> np.ndarray:
        """Slots in [a, b) that chose each dataset."""
        if len(self.p) == 1:
            return np.array([b - a], dtype=np.int64)
        total = np.zeros(len(self.p), dtype=np.int64)
        for c, lo, hi in self._spans(a, b):
            running = self._chunk(c)[1]
            total += running[hi] - running[lo]
        return total


class _Stream:
    """Everything a worker needs to build one rank's batches; picklable, no open files until first read."""

    def __init__(self, sources, weights, split, seq_len, micro_batch, seed, shuffle_buffer, dp_rank, dp_size,
                 document_mask, val_batches):
        self.sources, self.split = sources, split
        self.mixer = _Mixer(weights, seed)
        self.seq_len, self.micro_batch, self.seed = seq_len, micro_batch, seed
        self.shuffle_buffer, self.document_mask = shuffle_buffer, document_mask
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.val_batches = val_batches  # per source: batches each rank gets (validation only)

    def plan(self, state: dict) -> Iterator[tuple[np.ndarray, list[int], dict]]:
        """Endless (train) or finite (val) sequence of (dataset per row, the datasets' window numbers
        where this batch starts, state after it)."""
        B, n, r = self.micro_batch, self.dp_size, self.dp_rank
        if self.split == "train":
            slots, consumed = state["windows"], np.asarray(state["consumed"], dtype=np.int64)
            while True:
                first = slots + r * B
                before = consumed + self.mixer.counts(slots, first)
                choice = self.mixer.choices(first, first + B)
                consumed = consumed + self.mixer.counts(slots, slots + n * B)
                slots += n * B
                yield choice, before.tolist(), {"windows": slots, "consumed": consumed.tolist()}
        else:
            k = 0
            for d, count in enumerate(self.val_batches):
                for j in range(count):
                    if k >= state["batches"]:
                        before = [0] * len(self.sources)
                        before[d] = (j * n + r) * B
                        yield np.full(B, d, dtype=np.int64), before, {"batches": k + 1}
                    k += 1

    def read_batch(self, choice: np.ndarray, before: list[int]) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """The batch's windows in the storage dtype (compact: this is what crosses the process boundary),
        and, with document_mask, where a new document starts. A batch's rows from one dataset are
        consecutive windows of its stream, so each dataset is one contiguous read."""
        S1 = self.seq_len + 1
        rows = np.empty((len(choice), S1), dtype=self.sources[0].dtype)
        starts = np.zeros((len(choice), S1), dtype=bool) if self.document_mask else None
        for d, src in enumerate(self.sources):
            mask = choice == d
            n = int(np.count_nonzero(mask))
            if not n:
                continue
            tokens, cut = src.read(before[d] * S1, (before[d] + n) * S1, self.split == "train", self.seed,
                                   self.shuffle_buffer)
            tokens = tokens.reshape(n, S1)
            rows[mask] = tokens
            if starts is not None:
                cut = cut.reshape(n, S1)
                cut[:, 1:] |= tokens[:, :-1] == src.eos_id
                starts[mask] = cut
        return rows, starts

    def batches(self, state: dict, worker: int, num_workers: int) -> Iterator[tuple]:
        for k, (choice, before, _) in enumerate(self.plan(state)):
            if k % num_workers == worker:
                yield self.read_batch(choice, before)


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

    def remap_state(self, states: dict, dp_rank: int, dp_size: int) -> dict:
        """Saved states of the old DP ranks -> this rank's state (exact; see remap_data_state)."""
        return remap_data_state(states, dp_rank, dp_size, micro_batch=self.meta["micro_batch"])

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
        """Continue from a saved state. Saved under another DP size or micro_batch is fine as long as
        the global position splits evenly over this layout's ranks (see remap_data_state)."""
        if state.get("kind") == "markov":
            raise KilnError("the checkpoint's data-loader state comes from data.synthetic=markov, but this run "
                            "reads prepared shards: resume with the same data, or start a new train.name")
        if state.get("version") != STATE_VERSION or state.get("split") != self.stream.split:
            raise KilnError(f"data loader state: expected a v{STATE_VERSION} {self.stream.split} state, got "
                            f"v{state.get('version')} {state.get('split')} (saved by another kiln version?)")
        if len(state.get("datasets", [])) != len(self.meta["datasets"]):
            raise KilnError(f"data loader state: {len(state.get('datasets', []))} dataset(s) saved, "
                            f"{len(self.meta['datasets'])} configured; cannot resume the same data order")
        for key in ("seq_len",):
            if state.get(key) != self.meta[key]:
                raise KilnError(f"data loader state: {key} was {state.get(key)!r}, now {self.meta[key]!r}; "
                                f"cannot resume the same data order")
        for key in ("seed", "datasets"):
            if state.get(key) != self.meta[key]:
                log.warning("data loader state: %s changed %s -> %s; the data order after resume differs "
                            "from an uninterrupted run", key, state.get(key), self.meta[key])
        if self.stream.split == "train":
            windows = int(state["windows"])
            _check_split(windows, state.get("micro_batch"), self.meta["dp_size"], self.meta["micro_batch"])
            self._state = {"windows": windows, "consumed": [int(c) for c in state["consumed"]]}
        else:
            self._state = {"batches": int(state["batches"])}


def _check_split(windows: int, old_micro_batch, dp_size: int, micro_batch: int) -> None:
    if windows % (dp_size * micro_batch):
        raise KilnError(
            f"data loader state: {windows} windows consumed ({windows / (old_micro_batch or 1):g} global batches of "
            f"micro_batch {old_micro_batch}) cannot be split over dp_size={dp_size} x micro_batch={micro_batch} "
            f"without repeating or skipping a window; keep train.global_batch_tokens unchanged, or resume "
            f"with a DP size and micro_batch whose product divides {windows}")


def remap_data_state(states: dict, dp_rank: int, dp_size: int, micro_batch: Optional[int] = None) -> dict:
    """Map the train states saved by every old DP rank onto `dp_rank` of `dp_size`: exact.

    The position is global (slots consumed by the whole DP group, per-dataset windows), identical on
    every old rank; the new ranks continue from it with nothing lost or repeated. It must split into
    whole micro-batches per new rank (micro_batch defaults to the saved one), else a KilnError.
    """
    old = [states[k] for k in sorted(states, key=int)]
    if not old or any(s.get("split") != "train" or s.get("version") != STATE_VERSION for s in old):
        raise KilnError(f"data loader state: expected the saved v{STATE_VERSION} train states of the old ranks")
    positions = {(int(s["windows"]), tuple(s["consumed"])) for s in old}
    if len(positions) != 1:
        raise KilnError(f"data loader state: the saved ranks disagree on the data position {sorted(positions)}")
    new = dict(old[0])
    _check_split(int(new["windows"]), new.get("micro_batch"), dp_size, micro_batch or new["micro_batch"])
    new.update(dp_rank=dp_rank, dp_size=dp_size)
    return new


def build_loader(cfg, split: str, dp_rank: int, dp_size: int):
    """The batch stream `kiln train` reads on one DP rank: the Markov oracle source, or prepared shards."""
    micro = cfg.train.micro_batch
    if cfg.data.synthetic == "markov":
        from kiln.data.synthetic import MarkovLoader, MarkovSource

        source = MarkovSource(cfg.data.synthetic_vocab, seed=cfg.data.seed)
        return MarkovLoader(source, seq_len=cfg.data.seq_len, micro_batch=micro, seed=cfg.data.seed,
                            dp_rank=dp_rank, dp_size=dp_size, split=split,
                            max_batches=None if split == "train" else cfg.train.eval_steps)
    return shard_loader(cfg.data, split=split, micro_batch=micro, dp_rank=dp_rank, dp_size=dp_size,
                        vocab_size=cfg.model.vocab_size)


def shard_loader(data_cfg, *, split: str, micro_batch: int, dp_rank: int, dp_size: int,
                 vocab_size: int) -> TokenLoader:
    """A loader over prepared shards for one DP rank. Checks manifests (vocab, tokenizer) and the shards first
    (see the module doc)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
    entries = _dataset_entries(data_cfg)
    sources, manifests, first_shard = [], [], 0
    for salt, (path, _) in enumerate(entries):
        src, manifest = _load_source(path, salt, split, vocab_size, dp_rank, dp_size, data_cfg.on_bad_shard,
                                     first_shard)
        first_shard += len(manifest["splits"][split]["shards"])
        sources.append(src)
        manifests.append(manifest)
    first = manifests[0]["tokenizer"]
    for (path, _), m in zip(entries[1:], manifests[1:]):
        if m["tokenizer"]["sha256"] != first["sha256"]:
            raise KilnError(f"{path}/manifest.json: tokenizer {m['tokenizer']['name']} differs from "
                            f"{entries[0][0]}'s {first['name']}; a mixture needs one tokenizer")
    S1 = data_cfg.seq_len + 1
    val_batches = None
    if split == "val":  # whole global batches, dealt round-robin; the remainder (< dp_size batches) is unused
        val_batches = [s.epoch_tokens // S1 // micro_batch // dp_size for s in sources]
        if not sum(val_batches):
            need = dp_size * micro_batch * S1
            raise KilnError(f"{entries[0][0]}: validation split too small for one batch per rank "
                            f"({max(s.epoch_tokens for s in sources)} tokens < dp_size*micro_batch*(seq_len+1)="
                            f"{need}); raise val_fraction or lower micro_batch/seq_len")
    stream = _Stream(sources, [w for _, w in entries], split, data_cfg.seq_len, micro_batch, data_cfg.seed,
                     data_cfg.shuffle_buffer, dp_rank, dp_size, data_cfg.document_mask, val_batches)
    meta = {"seq_len": data_cfg.seq_len, "micro_batch": micro_batch, "dp_rank": dp_rank, "dp_size": dp_size,
            "seed": data_cfg.seed, "datasets": [p for p, _ in entries]}
    return TokenLoader(stream, data_cfg.num_workers, meta)
