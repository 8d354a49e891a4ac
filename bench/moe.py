"""MoE training throughput beside a dense model of equal active parameters, measured in the same run.

The MoE model routes each token to top_k of n_experts SwiGLU experts of width F; the dense model has
one SwiGLU of width top_k * F, so both do the same expert matmul FLOPs per token (the MoE adds the
router, the sort and the gather/scatter). The MoE is run twice: with torch._grouped_mm (where it
works for the device and dtype) and with the per-expert loop. Printed: tokens/s of each and the
ratios against dense, the number that says what routing costs. Each model runs --repeats times,
interleaved, and the best of each counts (shared machines are noisy).

    python bench/moe.py [--steps 8] [--experts 8] [--top-k 2] [--d-model 256] [--seq-len 256] [--device auto]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kiln.config import load_config  # noqa: E402
from kiln.model import Transformer, count_params  # noqa: E402
from kiln.model.loss import cross_entropy  # noqa: E402
from kiln.model.moe import moe_layers  # noqa: E402


def tokens_per_s(cfg, batches, steps: int, device: torch.device, dtype: torch.dtype, grouped: bool | None) -> float:
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(device)
    for layer in moe_layers(model):
        layer.experts.use_grouped_mm = grouped
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t0 = None
    for step in range(steps + 2):
        if step == 2:  # two warm-up steps
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        inp, tgt = batches[step % len(batches)]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = cross_entropy(model(inp), tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * inp.numel() / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadier on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ffn = 2 * args.d_model
    common = [f"model.d_model={args.d_model}", f"model.n_layers={args.layers}", "model.n_heads=4",
              "model.vocab_size=2048", f"data.seq_len={args.seq_len}", f"model.max_seq_len={args.seq_len}",
              "data.synthetic=markov"]
    moe = load_config([], common + [f"model.ffn_dim={ffn}", f"model.moe.n_experts={args.experts}",
                                     f"model.moe.top_k={args.top_k}"])
    dense = load_config([], common + [f"model.ffn_dim={ffn * args.top_k}"])
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        rows = torch.randint(0, 2048, (args.micro_batch, args.seq_len + 1), generator=g).to(device)
        batches.append((rows[:, :-1], rows[:, 1:]))
    print(f"device {device} ({dtype}); MoE {args.experts} experts top-{args.top_k} of width {ffn}: "
          f"{count_params(moe.model) / 1e6:.2f}M params, {count_params(moe.model, active=True) / 1e6:.2f}M active; "
          f"dense width {ffn * args.top_k}: {count_params(dense.model) / 1e6:.2f}M params")
    runs = {"dense": (dense, None), "moe grouped_mm (auto)": (moe, None), "moe per-expert loop": (moe, False)}
    best = {name: 0.0 for name in runs}
    for _ in range(args.repeats):
        for name, (cfg, grouped) in runs.items():
            best[name] = max(best[name], tokens_per_s(cfg, batches, args.steps, device, dtype, grouped))
    for name, tps in best.items():
        print(f"{name:<24} {tps:12,.0f} tokens/s   {tps / best['dense']:.2f}x of dense")

if __name__ == "__main__":
    main()
