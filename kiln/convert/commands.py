"""`kiln convert SRC --to hf|megatron|kiln --out DIR` and `kiln grow CKPT --out DIR`."""
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

    g = sub.add_parser(
        "grow", help="grow a trained model into a larger one with the same function (same logits)",
        description="Write a larger kiln checkpoint whose logits equal CKPT's (Gesmundo & Maile 2023 "
                    "function-preserving expansions). Give any of the sizes; each must be >= the parent's. "
                    "The output is model-only: training from it starts a fresh optimizer at step 0.",
        epilog="example: kiln grow runs/tiny --out runs/tiny-grown --d-model 192 --n-layers 6; "
               "then: kiln train runs/tiny-grown/config.yaml")
    g.add_argument("ckpt", metavar="CKPT", help="kiln run dir or checkpoint step dir")
    g.add_argument("--out", required=True, help="the grown run's directory (must be new or empty); its last part "
                   "becomes train.name")
    g.add_argument("--d-model", type=int, help="new model width (default: keep)")
    g.add_argument("--ffn-dim", type=int, help="new SwiGLU hidden size (default: keep)")
    g.add_argument("--n-heads", type=int, help="new query heads, same head_dim (default: keep)")
    g.add_argument("--n-kv-heads", type=int, help="new key/value heads, a multiple of the parent's (default: keep)")
    g.add_argument("--n-layers", type=int, help="new layer count (default: keep, or the parent's plus --insert-at's)")
    g.add_argument("--insert-at", metavar="I,J,...",
                   help="parent layer index each new layer goes before (the parent's n_layers appends); "
                        "repeats allowed (default: spread evenly)")
    g.add_argument("--seed", type=int, default=0, help="seed for the new parameters' random part")
    g.add_argument("--json", action="store_true", help="print a machine-readable summary")
    g.set_defaults(func=run_grow)


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


def run_grow(args: argparse.Namespace) -> int:
    from kiln.convert.grow import grow_checkpoint
    from kiln.errors import KilnError
    from kiln.model.grow import GrowTarget

    insert_at = None
    if args.insert_at is not None:
        try:
            insert_at = [int(x) for x in args.insert_at.split(",") if x.strip()]
        except ValueError:
            raise KilnError(f"--insert-at {args.insert_at!r}: expected comma-separated layer indices") from None
    for flag in ("d_model", "ffn_dim", "n_heads", "n_kv_heads", "n_layers"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise KilnError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    target = GrowTarget(args.d_model, args.ffn_dim, args.n_heads, args.n_kv_heads, args.n_layers, insert_at)
    summary = grow_checkpoint(args.ckpt, args.out, target, seed=args.seed)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    m = summary["model"]
    print(f"grew {summary['source']}: {summary['params_before']:,} -> {summary['params_after']:,} parameters "
          f"(d_model {m['d_model']}, ffn_dim {m['ffn_dim']}, heads {m['n_heads']}/{m['n_kv_heads'] or m['n_heads']} kv, "
          f"layers {m['n_layers']}) at {summary['out']}")
    print(f"optimizer state: {summary['optimizer']}")
    print(f"continue training: {summary['train_with']}")
    return 0
