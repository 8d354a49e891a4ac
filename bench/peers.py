"""kiln beside peer frameworks on the same Llama shape: CPU, fp32, one process, interleaved rounds.

    python bench/peers.py [--model configs/model/small.yaml] [--micro-batch 8] [--seq-len 256]
                          [--steps 8] [--rounds 3] [--threads 2] [--nanogpt-path DIR]

Contestants, each training the same shape on the same pre-generated token batches:
- `kiln train()`: kiln's whole training loop (metrics, LR schedule, clipping, finiteness check);
- `kiln model`: kiln's Transformer in the bare loop the peers get (forward, cross-entropy, backward,
  clip, AdamW), so model speed and loop overhead can be told apart;
- `torchtitan`: torchtitan's Llama3Model (its own defaults: fused QKV, ComplexRoPE) with the kiln
  shape, causal SDPA, in the bare loop with AdamW in torchtitan's default `fused` implementation;
- `nanoGPT` (with --nanogpt-path, a checkout of karpathy/nanoGPT): its GPT with the same width, depth,
  heads and vocabulary. Its MLP (4d GELU) and attention have exactly the matmul FLOPs of the SwiGLU
  Llama here, but LayerNorm, learned positions and no RoPE: compare it FLOPs-normalised (printed).

Each round runs every contestant once (warm-up step, then --steps timed steps), in order; the
median over rounds is reported with the ratio kiln/peer. A peer that is not importable is skipped
with the reason. torchtitan 0.3.0 is imported with its expert-parallel package (which needs triton,
a GPU compiler) replaced by an empty stand-in: a dense Llama never calls it.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import importlib
import json
import statistics
import sys
import tempfile
import time
import types
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import kiln.train as loop  # noqa: E402
from kiln.config import ModelConfig, load_config  # noqa: E402
from kiln.model import Transformer, flops_per_token  # noqa: E402
from kiln.optim import build_optimizer  # noqa: E402
from train_step import FixedBatches  # noqa: E402

EP_STAND_IN = "torchtitan.distributed.minimal_async_ep"
EP_NAMES = ("combine_op", "dispatch_op", "init_buffer", "maybe_update_minimal_async_ep_config",
            "MinimalAsyncEPDispatchMetadata")


def import_torchtitan():
    """torchtitan's llama3 package, or the reason it cannot be imported here."""
    try:
        import torchtitan  # noqa: F401
    except ImportError as exc:
        return None, f"not installed ({exc}); pip install --no-deps torchtitan (and its small deps)"
    if importlib.util.find_spec("triton") is None and EP_STAND_IN not in sys.modules:
        stand_in = types.ModuleType(EP_STAND_IN)
        for name in EP_NAMES:
            setattr(stand_in, name, None)
        sys.modules[EP_STAND_IN] = stand_in
    try:
        import torchtitan.models.llama3 as llama3
        from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
        from torchtitan.models.common.attention import ScaledDotProductAttention
        from torchtitan.models.common.config_utils import make_ffn_config, make_gqa_config
    except Exception as exc:  # a missing dependency or a changed API: say which
        return None, f"cannot import its llama3 model ({type(exc).__name__}: {exc})"
    return types.SimpleNamespace(llama3=llama3, ComplexRoPE=ComplexRoPE, Embedding=Embedding, Linear=Linear,
                                 RMSNorm=RMSNorm, SDPA=ScaledDotProductAttention, make_ffn_config=make_ffn_config,
                                 make_gqa_config=make_gqa_config,
                                 version=getattr(sys.modules["torchtitan"], "__version__", "?")), None


def torchtitan_model(tt, m: ModelConfig) -> nn.Module:
    """torchtitan's Llama3Model with kiln's shape (plain RoPE, untied unless kiln ties)."""
    init = {"weight": partial(nn.init.trunc_normal_, std=m.init_std), "bias": nn.init.zeros_}
    ones = {"weight": nn.init.ones_}
    d = m.d_model
    layers = [tt.llama3.Llama3TransformerBlock.Config(
        attention_norm=tt.RMSNorm.Config(normalized_shape=d, eps=m.norm_eps, param_init=ones),
        ffn_norm=tt.RMSNorm.Config(normalized_shape=d, eps=m.norm_eps, param_init=ones),
        attention=tt.make_gqa_config(dim=d, n_heads=m.n_heads, n_kv_heads=m.kv_heads, head_dim=m.dim_per_head,
                                     wqkv_param_init=init, wo_param_init=init, inner_attention=tt.SDPA.Config(),
                                     fuse_qkv=True, rope=tt.ComplexRoPE.Config(dim=m.dim_per_head,
                                                                               max_seq_len=m.max_seq_len,
                                                                               theta=m.rope_theta)),
        feed_forward=tt.make_ffn_config(dim=d, hidden_dim=m.ffn_hidden, w1_param_init=init, w2w3_param_init=init))
        for _ in range(m.n_layers)]
    cfg = tt.llama3.Llama3Model.Config(
        dim=d, vocab_size=m.vocab_size, enable_weight_tying=m.tie_embeddings,
        tok_embeddings=tt.Embedding.Config(num_embeddings=m.vocab_size, embedding_dim=d, param_init=init),
        norm=tt.RMSNorm.Config(normalized_shape=d, eps=m.norm_eps, param_init=ones),
        lm_head=tt.Linear.Config(in_features=d, out_features=m.vocab_size, param_init=init), layers=layers)
    model = cfg.build()
    model.init_states()
    return model


def nanogpt_model(path: Path, m: ModelConfig, seq_len: int):
    """nanoGPT's GPT with kiln's width, depth, heads and vocabulary (no bias, no dropout)."""
    sys.path.insert(0, str(path))
    try:
        nanogpt = importlib.import_module("model")
    finally:
        sys.path.remove(str(path))
    conf = nanogpt.GPTConfig(block_size=seq_len, vocab_size=m.vocab_size, n_layer=m.n_layers, n_head=m.n_heads,
                             n_embd=m.d_model, dropout=0.0, bias=False)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter count
        return nanogpt.GPT(conf)


def nanogpt_flops_per_token(model: nn.Module, m: ModelConfig, seq_len: int) -> float:
    """PaLM FLOPs of nanoGPT's model: 6N (N without the position table; the tied token table is the
    output matmul) + 12 L H Q T, the formula kiln uses for its own model."""
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    return 6 * n + 12 * m.n_layers * m.n_heads * m.dim_per_head * seq_len


def bare_loop(model: nn.Module, step_fn, opt, batches, steps: int, clip: float) -> float:
    """One warm-up step, then `steps` timed: forward, loss, backward, clip, AdamW. Returns tokens/s."""
    t0 = 0.0
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        loss = step_fn(model, batches[i % len(batches)])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * batches[0]["input"].numel() / (time.perf_counter() - t0)


def llama_step(model, batch):
    return F.cross_entropy(model(batch["input"]).flatten(0, 1).float(), batch["target"].flatten())


def nanogpt_step(model, batch):
    return model(batch["input"], batch["target"])[1]


def kiln_train(cfg, batches, steps: int) -> float:
    """kiln's train() on the fixed batches; tokens/s from its own per-step metrics, warm-up dropped."""
    loop.build_loader = lambda cfg, split, dp_rank, dp_size: FixedBatches(batches)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        cfg.train.run_dir, cfg.train.steps = tmp, steps + 1
        loop.train(cfg)
        rows = [json.loads(x) for x in (Path(tmp) / cfg.train.name / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["step"] > 1 and "tokens_per_s" in r]
    tokens = batches[0]["input"].numel()
    return len(timed) * tokens / sum(tokens / r["tokens_per_s"] for r in timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "configs/model/small.yaml")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per contestant per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--nanogpt-path", type=Path, default=None, help="a checkout of karpathy/nanoGPT")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config([args.model], [
        "data.synthetic=markov", f"data.seq_len={args.seq_len}", f"train.micro_batch={args.micro_batch}",
        "train.device=cpu", "parallel.mixed_precision=fp32", "model.attention=sdpa", "train.eval_every=0",
        "checkpoint.enabled=false", "logging.log_every=1", "logging.tensorboard=false", "logging.progress=false"])
    m = cfg.model
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        window = torch.randint(0, m.vocab_size, (args.micro_batch, args.seq_len + 1), generator=g)
        batches.append({"input": window[:, :-1].contiguous(), "target": window[:, 1:].contiguous()})

    def adamw(model, fused):
        return torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                 eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay, fused=fused)

    def kiln_model_run():
        torch.manual_seed(0)
        model = Transformer(m)
        opt = build_optimizer(model, cfg.optim, torch.device("cpu"), distributed=False)
        return bare_loop(model, llama_step, opt, batches, args.steps, cfg.optim.grad_clip)

    kiln_fpt = flops_per_token(m, args.seq_len)
    contestants = {"kiln train()": (lambda: kiln_train(cfg, batches, args.steps), kiln_fpt),
                   "kiln model": (kiln_model_run, kiln_fpt)}
    configs = {"kiln": f"{args.model.name}: d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads "
                       f"({m.kv_heads} kv), SwiGLU {m.ffn_hidden}, vocab {m.vocab_size}, tied={m.tie_embeddings}, "
                       f"attention sdpa, AdamW fused (kiln's optim.fused=auto on one CPU process)"}
    tt, why = import_torchtitan()
    if tt is None:
        print(f"torchtitan: skipped: {why}")
    else:
        def titan_run():
            torch.manual_seed(0)
            model = torchtitan_model(tt, m)
            return bare_loop(model, llama_step, adamw(model, fused=True), batches, args.steps, cfg.optim.grad_clip)
        contestants["torchtitan"] = (titan_run, kiln_fpt)
        configs["torchtitan"] = (f"{tt.version}: Llama3Model with the kiln shape, fuse_qkv=True, ComplexRoPE "
                                 f"theta {m.rope_theta}, ScaledDotProductAttention (causal), AdamW fused=True "
                                 f"(its default implementation)")
    if args.nanogpt_path is not None:
        try:
            probe = nanogpt_model(args.nanogpt_path, m, args.seq_len)
        except Exception as exc:
            print(f"nanoGPT: skipped: cannot build its GPT from {args.nanogpt_path} ({type(exc).__name__}: {exc})")
        else:
            nano_fpt = nanogpt_flops_per_token(probe, m, args.seq_len)
            del probe

            def nano_run():
                torch.manual_seed(0)
                model = nanogpt_model(args.nanogpt_path, m, args.seq_len)
                with contextlib.redirect_stdout(io.StringIO()):  # it prints its groups
                    opt = model.configure_optimizers(cfg.optim.weight_decay, cfg.optim.lr,
                                                     (cfg.optim.beta1, cfg.optim.beta2), "cpu")
                return bare_loop(model, nanogpt_step, opt, batches, args.steps, cfg.optim.grad_clip)
            contestants["nanoGPT"] = (nano_run, nano_fpt)
            configs["nanoGPT"] = (f"{args.nanogpt_path}: GPT(n_layer={m.n_layers}, n_head={m.n_heads}, "
                                  f"n_embd={m.d_model}, vocab={m.vocab_size}, block={args.seq_len}, bias=False, "
                                  f"dropout=0), its configure_optimizers (foreach AdamW on CPU)")
    else:
        print("nanoGPT: skipped: pass --nanogpt-path DIR (a checkout of karpathy/nanoGPT) to include it")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU fp32, batch "
          f"{args.micro_batch}x{args.seq_len}, {args.steps} timed steps x {args.rounds} interleaved rounds")
    for name, text in configs.items():
        print(f"  {name}: {text}")
    rates: dict[str, list[float]] = {name: [] for name in contestants}
    for r in range(args.rounds):
        for name, (run, _) in contestants.items():
            rates[name].append(run())
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:,.0f}" for n, v in rates.items()), flush=True)
    median = {n: statistics.median(v) for n, v in rates.items()}
    ref = median["kiln train()"]
    print(f"\n{'contestant':<14} {'tokens/s':>10} {'GFLOP/s':>9} {'kiln train()/peer':>18} {'FLOPs-normalised':>17}")
    for name, (_, fpt) in contestants.items():
        gflops = median[name] * fpt / 1e9
        raw = "" if name == "kiln train()" else f"{ref / median[name]:.3f}"
        flop_ratio = "" if name == "kiln train()" else f"{ref * kiln_fpt / (median[name] * fpt):.3f}"
        print(f"{name:<14} {median[name]:>10,.0f} {gflops:>9.2f} {raw:>18} {flop_ratio:>17}")


if __name__ == "__main__":
    main()
