"""`kiln data prepare`: text -> tokens (+EOS per document) -> fixed-size samples in tar shards + manifest.

The split follows a running token quota, in input order (see `_Splitter`): whole documents go to
validation while it is behind `val_fraction` of the tokens seen, except documents too large for
that (a corpus of a few big files, or one), which are cut: their tail goes to validation. The
split stays within 1.5x the fraction and is deterministic for any number of processes.
Tokenization runs in `num_proc` spawned processes, with at most a few chunks in flight so memory
stays bounded. The output is written to a temporary sibling directory and renamed into place, so a
directory with a manifest is always complete. Same inputs and options -> byte-identical shards.
"""
from __future__ import annotations

import collections
import logging
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from kiln.data import sources, tokenizer as toks
from kiln.data.shards import FORMAT, FORMAT_VERSION, MANIFEST, ShardWriter, dtype_for, write_manifest
from kiln.errors import KilnError

log = logging.getLogger("kiln.data")
CHUNK_BYTES = 1 << 18  # text per task sent to a tokenizer process
DEFAULT_SAMPLE_TOKENS = 2048

_worker_tok: Optional[toks.Tokenizer] = None


def _init_worker(kind: str, serial: Optional[str], eos_id: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process: the pool is the parallelism
    global _worker_tok
    _worker_tok = _make_tokenizer(kind, serial, eos_id)


def _make_tokenizer(kind: str, serial: Optional[str], eos_id: int) -> toks.Tokenizer:
    if kind == "byte":
        return toks.ByteTokenizer()
    from tokenizers import Tokenizer as RawTokenizer

    return toks.HFTokenizer(RawTokenizer.from_str(serial), "worker", eos_id)


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return encode_with(_worker_tok, texts)


def encode_with(tok: toks.Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize one chunk: (every document's tokens followed by EOS, concatenated; per-document lengths)."""
    if isinstance(tok, toks.ByteTokenizer):
        ids = [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]
    else:
        ids = [np.asarray(x, dtype=np.uint32) for x in tok.encode_batch(texts)]
    eos = np.asarray([tok.eos_id], dtype=np.uint32)
    parts = [p for doc in ids for p in (doc.astype(np.uint32), eos)]
    lengths = np.asarray([len(doc) + 1 for doc in ids], dtype=np.int64)
    return (np.concatenate(parts) if parts else np.zeros(0, np.uint32)), lengths


class _Splitter:
    """Assigns tokens to train or val by a running token quota T = val_fraction x tokens seen.

    While validation is behind T, a document goes to it whole when it is at most T/2 tokens (so
    validation never exceeds 1.5 T). A larger document, which is what a corpus of few documents
    consists of, is cut instead: its last T - val tokens go to validation (once that is at least
    `min_piece` tokens, so validation is not a scatter of fragments) and the rest, ended with EOS,
    to training. Decided in input order in one process: deterministic for any `num_proc`.
    """

    def __init__(self, val_fraction: float, eos_id: int, min_piece: int):
        self.fraction, self.eos, self.min_piece = val_fraction, np.asarray([eos_id], np.uint32), max(1, min_piece)
        self.seen = self.val = 0
        self.documents = [0, 0]  # documents with tokens in train, val (a cut one counts in both)
        self.cut = 0

    def __call__(self, ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        parts: tuple[list, list] = ([], [])
        start = 0
        for n in lengths.tolist():
            doc, start = ids[start:start + n], start + n
            self.seen += n
            target = self.fraction * self.seen
            split = 0
            if self.val < target and n <= target / 2:
                split = 1
            elif self.val < target and target - self.val >= self.min_piece:
                take = int(round(target - self.val))
                parts[0].extend((doc[: n - take], self.eos))
                parts[1].append(doc[n - take:])
                self.seen += 1
                self.val += take
                self.documents[0] += 1
                self.documents[1] += 1
                self.cut += 1
                continue
            parts[split].append(doc)
            self.val += n * split
            self.documents[split] += 1
        return tuple(np.concatenate(p) if p else np.zeros(0, np.uint32) for p in parts)


def _chunks(docs: Iterator[sources.Document], stats: dict):
    texts, size = [], 0
    for doc in docs:
        nbytes = len(doc.text.encode("utf-8"))
        texts.append(doc.text)
        stats["documents"] += 1
        stats["bad_utf8"] += doc.bad_utf8
        stats["bytes"] += nbytes
        size += nbytes
        if size >= CHUNK_BYTES:
            yield texts, size
            texts, size = [], 0
    if texts:
        yield texts, size


def _build_tokenizer(spec: str, files, text_field: str, max_bytes: Optional[int]) -> toks.Tokenizer:
    kind, arg = toks.parse_spec(spec)
    if kind == "byte":
        return toks.ByteTokenizer()
    if kind == "file":
        return toks.from_file(arg)
    if kind == "transformers":
        return toks.from_transformers(arg)
    t0 = time.time()
    tok = toks.train_bpe((d.text for d in sources.read_documents(files, text_field, max_bytes)), arg)
    log.info("trained %s in %.1fs", tok.name, time.time() - t0)
    return tok


def prepare(inputs: list[str], out_dir: str, tokenizer: str = "byte", *, text_field: str = "text",
            samples_per_shard: int = 2048, val_fraction: float = 0.01, num_proc: Optional[int] = None,
            max_bytes: Optional[int] = None, sample_tokens: int = DEFAULT_SAMPLE_TOKENS,
            progress: Optional[bool] = None) -> dict:
    """Tokenize `inputs` into `out_dir` (shards, tokenizer.json, manifest.json); returns the manifest."""
    if samples_per_shard < 1 or sample_tokens < 2:
        raise KilnError("data prepare: samples_per_shard must be >= 1 and sample_tokens >= 2")
    if not 0 <= val_fraction < 1:
        raise KilnError(f"data prepare: val_fraction {val_fraction} must be in [0, 1)")
    out = Path(out_dir)
    if out.exists() and not (out / MANIFEST).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise KilnError(f"data prepare: {out} exists and is not a kiln data directory; choose an empty --out")
    files = sources.expand_inputs(list(inputs))
    t0 = time.time()
    tok = _build_tokenizer(tokenizer, files, text_field, max_bytes)
    dtype = dtype_for(tok.vocab_size)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest = _write(tmp, files, tok, dtype, text_field, max_bytes, val_fraction, samples_per_shard,
                          sample_tokens, num_proc or min(os.cpu_count() or 1, 8), progress)
        manifest["inputs"] = list(inputs)
        serial = tok.to_str()
        if serial is not None:
            (tmp / toks.TOKENIZER_FILE).write_text(serial)
        write_manifest(tmp, manifest)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t = manifest["totals"]
    log.info("prepared %s: %d documents, %d tokens, %d shards in %.1fs", out, t["documents"], t["tokens"],
             t["shards"], time.time() - t0)
    return manifest


def _write(tmp: Path, files, tok, dtype, text_field, max_bytes, val_fraction, samples_per_shard, sample_tokens,
           num_proc, progress) -> dict:
    from tqdm import tqdm

    writers = [ShardWriter(tmp, split, sample_tokens, samples_per_shard, dtype) for split in ("train", "val")]
    stats = {"documents": 0, "bad_utf8": 0, "bytes": 0}
    total_bytes = sum(f.stat().st_size for f in files)
    if max_bytes is not None:
        total_bytes = min(total_bytes, max_bytes)
    chunks = _chunks(sources.read_documents(files, text_field, max_bytes), stats)
    splitter = _Splitter(val_fraction, tok.eos_id, sample_tokens // 4)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr,
               disable=(not progress) if progress is not None else None, smoothing=0.1)
    tokens = docs_done = 0
    t0 = time.time()

    def consume(result, nbytes, ndocs):
        nonlocal tokens, docs_done
        train_ids, val_ids = splitter(*result)
        n = len(train_ids) + len(val_ids)
        docs_done += ndocs
        writers[0].add(train_ids)
        writers[1].add(val_ids)
        tokens += n
        bar.update(nbytes)
        bar.set_postfix(docs=docs_done, tok_s=f"{tokens / max(time.time() - t0, 1e-9):.3g}", refresh=False)

    if num_proc <= 1:
        for texts, nbytes in chunks:
            consume(encode_with(tok, texts), nbytes, len(texts))
    else:
        ctx = mp.get_context("spawn")  # tokenizers' thread pool is not fork-safe
        with ctx.Pool(num_proc, _init_worker, ("byte" if tok.name == "byte" else "json", tok.to_str(), tok.eos_id)) as pool:
            pending: collections.deque = collections.deque()
            for texts, nbytes in chunks:
                pending.append((pool.apply_async(_encode_chunk, (texts,)), nbytes, len(texts)))
                while len(pending) > 2 * num_proc:
                    res, nb, nd = pending.popleft()
                    consume(res.get(), nb, nd)
            while pending:
                res, nb, nd = pending.popleft()
                consume(res.get(), nb, nd)
    bar.close()
    if stats["documents"] == 0:
        raise KilnError(f"data prepare: the inputs ({len(files)} file(s)) contain no text")
    if stats["bad_utf8"]:
        log.warning("%d document(s) were not valid UTF-8; invalid bytes became U+FFFD", stats["bad_utf8"])
    splits = {name: w.finish() for name, w in zip(("train", "val"), writers)}
    for (name, split), docs in zip(splits.items(), splitter.documents):
        split["documents"] = docs
    if splits["train"]["samples"] == 0:
        raise KilnError(f"data prepare: only {tokens} tokens, fewer than one sample of {sample_tokens}; "
                        f"add text or lower sample_tokens")
    if val_fraction > 0 and splits["val"]["samples"] == 0:
        log.warning("validation split is empty (fewer than %d tokens); raise val_fraction", sample_tokens)
    return {
        "format": FORMAT, "version": FORMAT_VERSION,
        "tokenizer": tok.identity(), "vocab_size": tok.vocab_size, "dtype": dtype,
        "sample_tokens": sample_tokens, "samples_per_shard": samples_per_shard, "val_fraction": val_fraction,
        "text_field": text_field, "max_bytes": max_bytes, "splits": splits,
        "totals": {"documents": stats["documents"], "bytes": stats["bytes"], "tokens_encoded": tokens,
                   "tokens": splits["train"]["tokens"] + splits["val"]["tokens"],
                   "samples": splits["train"]["samples"] + splits["val"]["samples"],
                   "shards": len(splits["train"]["shards"]) + len(splits["val"]["shards"]),
                   "non_utf8_documents": stats["bad_utf8"], "documents_cut": splitter.cut},
    }


def ensure_prepared(data_cfg) -> None:
    """Prepare `data.path` from `data.prepare` on first use (call on rank 0 only, then barrier)."""
    path, spec = data_cfg.path, data_cfg.prepare
    if not path or spec is None or (Path(path) / MANIFEST).is_file():
        return
    if not spec.inputs:
        raise KilnError("config error: data.prepare.inputs: empty, nothing to prepare data.path from")
    prepare(list(spec.inputs), path, spec.tokenizer, text_field=spec.text_field,
            samples_per_shard=spec.samples_per_shard, val_fraction=spec.val_fraction, max_bytes=spec.max_bytes,
            sample_tokens=spec.sample_tokens)
