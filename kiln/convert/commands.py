"""`kiln convert SRC --to hf|megatron|kiln --out DIR`."""
from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert checkpoints between kiln, Hugging Face Llama and Megatron-Core GPT",
        description="Convert a checkpoint. SRC is a kiln run dir or step dir, a Hugging Face Llama dir, a "
                    "Megatron-Core checkpoint dir or a DeepSpeed checkpoint dir; its format is detected.",
        epilog="example: kiln convert runs/tiny --to hf --out hf/tiny")
    p.add_argument("src", metavar="SRC", help="checkpoint directory to read")
    p.add_argument("--to", required=True, choices=("hf", "megatron", "kiln"), help="target format")
    p.add_argument("--out", required=True, help="output directory (must be new or empty)")
    p.add_argument("--from", dest="src_format", choices=("kiln", "hf", "megatron", "deepspeed"),
                   help="source format (default: detect)")
    p.add_argument("--tp", type=int, default=1, help="Megatron tensor-parallel size of the output")
    p.add_argument("--pp", type=int, default=1, help="Megatron pipeline-parallel size of the output")
    p.add_argument("--vocab-multiple", type=int, default=128,
                   help="Megatron: pad the vocab to a multiple of this times --tp (Megatron-LM default 128)")
    p.add_argument("--megatron-format", choices=("torch", "torch_dist"), default="torch",
                   help="Megatron: legacy per-rank files (torch) or dist_checkpointing (torch_dist, Megatron-LM's default)")
    p.add_argument("--max-shard-size", default="5GB", help="Hugging Face: largest safetensors shard (e.g. 5GB, 500MB)")
    p.add_argument("--dtype", choices=("keep", "fp32", "bf16", "fp16"), default="keep", help="output dtype")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")
    p.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from kiln.convert.convert import convert

    summary = convert(args.src, args.to, args.out, tp=args.tp, pp=args.pp, fmt=args.src_format,
                      max_shard_size=args.max_shard_size, dtype=args.dtype, vocab_multiple=args.vocab_multiple,
                      megatron_format=args.megatron_format)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"converted {summary['source_format']} checkpoint {summary['source']} -> {args.to} at {summary['out']} "
              f"({len(summary['files'])} files)")
    return 0
