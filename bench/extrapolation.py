"""Length extrapolation: ALiBi vs RoPE, trained at --train-len and evaluated at --eval-len.

One tiny decoder per position scheme, same seed, data and optimizer, trained on one of two sources:
  markov     kiln's order-1 Markov chain (data.synthetic=markov): only the previous token matters
  switching  a per-segment unigram distribution that changes every ~--segment tokens: the best
             prediction averages the recent tokens, so attention must weigh distance
Prints the eval loss per range of positions (the first range is the trained length), the
entropy floor where it is known, and the ratio of the beyond-training loss to the in-training loss.

    python bench/extrapolation.py [--source switching] [--steps 400] [--train-len 128] [--eval-len 512]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from kiln.config import ModelConfig
from kiln.data.synthetic import MarkovSource, switching_unigram
from kiln.model.llama import Transformer


def run(position: str, args) -> tuple[list[float], float]:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=2, n_heads=4, ffn_dim=2 * args.d_model,
                      max_seq_len=args.eval_len, attention="sdpa", position=position)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    markov = MarkovSource(args.vocab, seed=1)

    def sample(n, length, g):
        return markov.sample(n, length, g) if args.source == "markov" else switching_unigram(n, length, args.vocab, args.segment, g)

    g = torch.Generator().manual_seed(0)
    start = time.time()
    for _ in range(args.steps):
        x = sample(args.batch, args.train_len + 1, g)
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x = sample(32, args.eval_len + 1, torch.Generator().manual_seed(99))
    with torch.no_grad():
        per = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten(), reduction="none").view(32, -1)
    edges = list(range(0, args.eval_len + 1, args.train_len))
    return [per[:, a:b].mean().item() for a, b in zip(edges, edges[1:])], time.time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", choices=("markov", "switching"), default="switching")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--train-len", type=int, default=128)
    ap.add_argument("--eval-len", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32)
    ap.add_argument("--segment", type=int, default=48)
    ap.add_argument("--d-model", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    floor = f", entropy rate {MarkovSource(args.vocab, seed=1).entropy_rate():.3f}" if args.source == "markov" else ""
    print(f"{args.source} source, trained at {args.train_len} for {args.steps} steps, evaluated at {args.eval_len}{floor}")
    for position in ("alibi", "rope"):
        losses, seconds = run(position, args)
        ranges = "  ".join(f"{l:.3f}" for l in losses)
        print(f"  {position:<6} loss per {args.train_len}-token range: {ranges}   beyond/within "
              f"{sum(losses[1:]) / len(losses[1:]) / losses[0]:.3f}  ({seconds:.0f}s)")


if __name__ == "__main__":
    main()
