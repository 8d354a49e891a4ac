"""`kiln data prepare|inspect`: build token shards from text, and look inside them."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from kiln.cli import DefaultsHelpFormatter


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="prepare token shards from text; inspect them",
                                 description="Prepare and inspect tokenized webdataset shards.")
    sub = data.add_subparsers(dest="data_verb", metavar="prepare|inspect")
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])

    p = sub.add_parser("prepare", help="tokenize text into shards + manifest.json",
                       formatter_class=DefaultsHelpFormatter,
                       description="Tokenize .txt/.jsonl/.parquet files (or 'stdlib') into webdataset shards "
                                   "of fixed-size token samples plus manifest.json. See docs/data.md.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="files, directories (every file below), globs, or 'stdlib' (this Python's "
                        "hand-written standard-library sources)")
    p.add_argument("--out", required=True, help="output directory (new, empty, or an earlier prepare output)")
    p.add_argument("--tokenizer", default="byte",
                   help="byte (UTF-8 bytes + EOS) | bpe:VOCAB (train a byte-level BPE on the inputs) | "
                        "path/to/tokenizer.json")
    p.add_argument("--text-field", default="text", help="jsonl field / parquet column holding the text")
    p.add_argument("--samples-per-shard", type=int, default=2048, help="samples per tar shard")
    p.add_argument("--sample-tokens", type=int, default=2048,
                   help="tokens per stored sample (the loader packs across samples, so not the sequence length)")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="share of tokens held out for validation (split by documents, cutting large ones)")
    p.add_argument("--num-proc", type=int, default=None, help="tokenizer processes (default: the CPUs, at most 8)")
    p.add_argument("--max-bytes", type=int, default=None, help="stop after this much input text (default: no limit)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON instead of a summary")
    p.set_defaults(func=_prepare)

    i = sub.add_parser("inspect", help="summarize a prepared directory and decode samples",
                       description="Print the manifest summary and decode a few samples back to text.")
    i.add_argument("dir", help="a `kiln data prepare` output directory")
    i.add_argument("--samples", type=int, default=2, help="how many samples to decode")
    i.add_argument("--chars", type=int, default=400, help="characters shown per sample")
    i.add_argument("--split", default="train", choices=("train", "val"))
    i.add_argument("--verify", action="store_true", help="check every shard's sha256 and structure")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=_inspect)


def _prepare(args: argparse.Namespace) -> int:
    from kiln.data.prepare import prepare

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    manifest = prepare(args.inputs, args.out, args.tokenizer, text_field=args.text_field,
                       samples_per_shard=args.samples_per_shard, val_fraction=args.val_fraction,
                       num_proc=args.num_proc, max_bytes=args.max_bytes, sample_tokens=args.sample_tokens)
    if args.json:
        print(json.dumps(manifest, indent=2, sort_keys=True))
    else:
        print(_summary(args.out, manifest))
    return 0


def _summary(path: str, m: dict) -> str:
    t = m["tokenizer"]
    lines = [f"{path}: tokenizer {t['name']} (vocab {m['vocab_size']}, eos {t['eos_id']}, sha256 {t['sha256'][:12]}), "
             f"{m['dtype']}, {m['sample_tokens']} tokens/sample"]
    for name, split in m["splits"].items():
        lines.append(f"  {name:5s} {len(split['shards']):4d} shards {split['samples']:8d} samples "
                     f"{split['tokens']:12,d} tokens {split['documents']:8d} documents")
    tot = m["totals"]
    lines.append(f"  input: {tot['documents']} documents, {tot['bytes']:,} bytes, "
                 f"{tot['non_utf8_documents']} not valid UTF-8; {tot['tokens_encoded'] - tot['tokens']} tail tokens dropped")
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> int:
    import numpy as np

    from kiln.data.shards import index_shard, read_manifest
    from kiln.data.tokenizer import load_tokenizer

    m = read_manifest(args.dir)
    tok = load_tokenizer(args.dir)
    dtype = np.dtype(m["dtype"]).newbyteorder("<")
    sample_bytes = m["sample_tokens"] * dtype.itemsize
    shards = m["splits"][args.split]["shards"]
    if args.verify:
        for entry in m["splits"]["train"]["shards"] + m["splits"]["val"]["shards"]:
            index_shard(args.dir, entry, sample_bytes)  # raises naming the bad shard
    samples = []
    for entry in shards:
        if len(samples) >= args.samples:
            break
        index = index_shard(args.dir, entry, sample_bytes)
        with open(index.path, "rb") as fh:
            for off in index.offsets[: args.samples - len(samples)]:
                fh.seek(int(off))
                ids = np.frombuffer(fh.read(sample_bytes), dtype=dtype).tolist()
                samples.append({"tokens": ids[:16], "text": tok.decode(ids)[: args.chars]})
    if args.json:
        print(json.dumps({"manifest": m, "samples": samples, "verified": args.verify}, indent=2))
        return 0
    print(_summary(args.dir, m))
    if args.verify:
        print("  all shards verified (sha256, structure)")
    for n, s in enumerate(samples):
        print(f"--- {args.split} sample {n} (first ids {s['tokens'][:8]}) ---")
        print(s["text"])
    return 0
