"""Streaming loader throughput vs a numpy memmap and vs what the ~20M model consumes on CPU.

One run measures, on the same tokens (the Python standard library, byte tokenizer):
  stream      kiln's loader, one rank, `--workers` DataLoader workers, packed [B, S] batches
  memmap      a map-style Dataset over np.memmap of the same tokens, same DataLoader settings
              (random windows, default collate): the classic nanoGPT/Megatron-style reader
  memmap-raw  in-process contiguous slices of the memmap, no DataLoader (an upper bound)
  train       tokens/s of forward+backward+AdamW for configs/model/small.yaml on this CPU
Targets: stream >= 0.5x memmap and >= 20x train.

    python bench/data.py [--data DIR] [--seconds 5] [--workers 2] [--batch 16] [--seq 1024]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.utils.data as tud

ROOT = Path(__file__).resolve().parent.parent


def timed(batches, seconds: float) -> float:
    """Input tokens per second over `seconds`, after one warm-up batch (worker start-up excluded)."""
    it = iter(batches)
    next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += next(it)["input"].numel()
    return n / (time.perf_counter() - t0)


class MemmapWindows(tud.Dataset):
    def __init__(self, path: str, seq: int):
        self.path, self.seq = path, seq
        self.n = os.path.getsize(path) // 2 // (seq + 1)
        self.data = None

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.data is None:
            self.data = np.memmap(self.path, dtype=np.uint16, mode="r")
        w = torch.from_numpy(self.data[i * (self.seq + 1):(i + 1) * (self.seq + 1)].astype(np.int64))
        return {"input": w[:-1], "target": w[1:]}


def memmap_loader(path, seq, batch, workers):
    ds = MemmapWindows(path, seq)
    sampler = tud.RandomSampler(ds, replacement=True, num_samples=10**9)
    return tud.DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, prefetch_factor=4 if workers else None)


def memmap_raw(path, seq, batch):
    data = np.memmap(path, dtype=np.uint16, mode="r")
    span = batch * (seq + 1)
    k = 0
    while True:
        if (k + 1) * span > len(data):
            k = 0
        w = torch.from_numpy(data[k * span:(k + 1) * span].astype(np.int64)).view(batch, seq + 1)
        k += 1
        yield {"input": w[:, :-1].contiguous(), "target": w[:, 1:].contiguous()}


def train_tokens_per_s(seq: int, batch: int, steps: int) -> float:
    from kiln.config import load_config
    from kiln.model.llama import Transformer, count_params

    cfg = load_config([ROOT / "configs/model/small.yaml"], [f"data.seq_len={seq}", "data.synthetic=markov"])
    model = Transformer(cfg.model)
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.model.vocab_size, (batch, seq))
    print(f"train model: configs/model/small.yaml, {count_params(cfg.model) / 1e6:.1f}M params, "
          f"batch {batch}x{seq}, {torch.get_num_threads()} threads", file=sys.stderr)

    def step():
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch * seq / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="a prepared directory to reuse (default: prepare stdlib into a temp dir)")
    ap.add_argument("--max-bytes", type=int, default=16_000_000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--train-steps", type=int, default=3)
    args = ap.parse_args()

    from kiln.config import DataConfig
    from kiln.data.loader import shard_loader
    from kiln.data.prepare import prepare
    from kiln.data.shards import index_shard, read_manifest

    tmp = tempfile.mkdtemp(prefix="kiln-bench-data-")
    data = args.data or os.path.join(tmp, "stdlib")
    if not args.data:
        t0 = time.perf_counter()
        prepare(["stdlib"], data, "byte", max_bytes=args.max_bytes, samples_per_shard=512, val_fraction=0.0,
                progress=False)
        print(f"prepared stdlib ({args.max_bytes / 1e6:.0f} MB, byte tokenizer) in {time.perf_counter() - t0:.1f}s",
              file=sys.stderr)
    manifest = read_manifest(data)
    # The same tokens, flat, for the memmap references.
    flat = os.path.join(tmp, "tokens.u16")
    sample_bytes = manifest["sample_tokens"] * 2
    with open(flat, "wb") as fh:
        for entry in manifest["splits"]["train"]["shards"]:
            index = index_shard(data, entry, sample_bytes)
            raw = Path(index.path).read_bytes()
            for off in index.offsets:
                fh.write(raw[off:off + sample_bytes])
    tokens = os.path.getsize(flat) // 2
    print(f"tokens: {tokens:,} in {manifest['totals']['shards']} shards; batch {args.batch}x{args.seq}, "
          f"{args.workers} workers, {args.seconds:.0f}s per measurement", file=sys.stderr)

    cfg = DataConfig(path=data, seq_len=args.seq, num_workers=args.workers)
    stream = timed(shard_loader(cfg, split="train", micro_batch=args.batch, dp_rank=0, dp_size=1,
                                vocab_size=manifest["vocab_size"]), args.seconds)
    mm = timed(memmap_loader(flat, args.seq, args.batch, args.workers), args.seconds)
    raw = timed(memmap_raw(flat, args.seq, args.batch), args.seconds)
    train = train_tokens_per_s(args.seq, args.train_batch, args.train_steps)

    print(f"{'reader':12s} {'tokens/s':>14s}")
    for name, v in (("stream", stream), ("memmap", mm), ("memmap-raw", raw), ("train", train)):
        print(f"{name:12s} {v:14,.0f}")
    ok_mm, ok_train = stream >= 0.5 * mm, stream >= 20 * train
    print(f"stream / memmap     = {stream / mm:6.2f}x  (target >= 0.5x) {'PASS' if ok_mm else 'FAIL'}")
    print(f"stream / memmap-raw = {stream / raw:6.2f}x  (no target: in-process slicing, no DataLoader)")
    print(f"stream / train      = {stream / train:6.1f}x  (target >= 20x) {'PASS' if ok_train else 'FAIL'}")
    return 0 if ok_mm and ok_train else 1


if __name__ == "__main__":
    sys.exit(main())
