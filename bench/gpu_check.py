"""One prepared check of kiln on one GPU: does it run on CUDA, and how fast. Called by bench/gpu_check.sh.

    bash bench/gpu_check.sh [--out DIR] [--budget SECONDS]     # on a machine with one CUDA GPU
    bash bench/gpu_check.sh --cpu                              # smoke mode: every part, tiny shapes, CPU

Parts, in order (the cheap functional checks first, the slow compiled runs last):
- env: device, torch/CUDA versions, flash-attn status, the bf16 peak kiln knows for the device;
- attention: flash, sdpa and math agree (forward and input gradients) with an fp32 math reference in bf16,
  causal, block-causal (packed documents) and sliding-window;
- checkpoint: kiln's DCP save and load round trip (model and AdamW state, bit-exact), then one more step;
- fsdp2: one FSDP2 step on a one-rank mesh (bf16 parameters, fp32 reduction, fused AdamW on DTensors);
- deepspeed: one DeepSpeed ZeRO-1 step through kiln's engine;
- tput-*: the 1B Llama (configs/model/1b.yaml) at sequence 2048: tokens/s, MFU (PaLM formula, bf16 peak)
  and peak memory with sdpa and flash-attn, eager and torch.compile, without and with selective AC.

Each part runs in its own process under a timeout cut to what is left of --budget, and its result is
appended to DIR/results.jsonl as soon as it ends; the table is printed and written to DIR/table.md.
A part that cannot fit the remaining budget is recorded as skipped. In --cpu mode the parts run in
this process on tiny shapes (compile with the aot_eager backend), so the whole check takes seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GIB = 2 ** 30
# The 1B model at sequence 2048 on the GPU; a 2-layer toy in --cpu smoke mode.
SMOKE_MODEL = ["model.vocab_size=256", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
               "model.ffn_dim=128", "model.max_seq_len=64"]


@dataclass(frozen=True)
class Part:
    name: str
    timeout_s: int  # on the GPU; the orchestrator cuts it to what is left of the budget
    min_s: int  # not started with less than this left


def throughput_parts() -> list[Part]:
    parts = []
    for ac in ("none", "selective"):
        for compiled in (False, True):
            for attention in ("sdpa", "flash"):
                name = f"tput-{attention}-{'compile' if compiled else 'eager'}{'-ac' if ac != 'none' else ''}"
                parts.append(Part(name, 150 if compiled else 75, 60 if compiled else 30))
    # eager (no AC) first, then compile, then the AC variants: what matters most runs first
    return parts


PARTS = [Part("env", 30, 5), Part("attention", 60, 15), Part("checkpoint", 60, 20), Part("fsdp2", 90, 25),
         Part("deepspeed", 120, 30)] + throughput_parts()


# ---------------------------------------------------------------------------------------------
# helpers shared by the parts
# ---------------------------------------------------------------------------------------------

def device_and_dtype(cpu: bool):
    import torch

    from kiln.distributed import pick_device

    device = pick_device("cpu" if cpu else "cuda")
    return device, torch.bfloat16


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def make_config(args, extra=()):
    from kiln.config import load_config

    if args.cpu:
        files, shape = [], SMOKE_MODEL + [f"data.seq_len={args.seq_len}"]
    else:
        files, shape = [args.model], [f"data.seq_len={args.seq_len}", f"model.max_seq_len={max(args.seq_len, 16)}"]
    return load_config(files, shape + [
        "data.synthetic=markov", "data.synthetic_vocab=16", f"train.micro_batch={args.micro_batch}",
        f"train.device={'cpu' if args.cpu else 'cuda'}", "train.eval_every=0", "logging.log_every=1",
        "logging.tensorboard=false", "logging.progress=false", "optim.warmup_steps=1"] + list(extra))


def random_batches(cfg, device, n: int = 2) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        w = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch, cfg.data.seq_len + 1), generator=g)
        out.append({"input": w[:, :-1].contiguous().to(device), "target": w[:, 1:].contiguous().to(device)})
    return out


def build_runtime(cfg):
    """What `kiln train` builds for one process: the model through setup_parallel (full or sharded init,
    parallelize: AC, compile), AdamW through build_optimizer (fused where `optim.fused=auto` says)."""
    import torch

    from kiln.model import Transformer
    from kiln.optim import build_optimizer
    from kiln.parallel import setup_parallel

    torch.manual_seed(cfg.train.seed)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    rt = setup_parallel(cfg, model, 1, 0)
    opts = rt.build_optimizers(lambda part: build_optimizer(part, cfg.optim, rt.device, distributed=False))
    return rt, opts


def fast_paths(cfg, device, opts, dtype) -> dict:
    """Which fast paths this run has on: kiln resolves each `auto` per device (see docs/benchmarks.md)."""
    from kiln.model.attention import resolve_backend
    from kiln.parallel.parallelize import compile_enabled, mixed_precision_dtype

    fused = [g.get("fused") for o in opts for g in getattr(o, "param_groups", [])]
    return {"attention": resolve_backend(cfg.model.attention, device, dtype),
            "compile": compile_enabled(cfg.parallel.compile, device),
            "fused_adamw": bool(fused) and all(bool(f) for f in fused),
            "precision": str(mixed_precision_dtype(cfg, device)).replace("torch.", ""),
            "activation_checkpoint": cfg.parallel.activation_checkpoint}


def train_steps(rt, opts, cfg, batches, steps: int, warmup: int) -> dict:
    """`warmup` untimed steps, then `steps` timed ones (synchronized): kiln's own `train_step` (forward and
    backward, clip, the on-device finiteness check, AdamW) with kiln's LR schedule, as `kiln train` runs it."""
    from kiln.optim import lr_at, set_lr
    from kiln.train import train_step

    total = warmup + steps
    result, t0 = None, None
    for i in range(total):
        if i == warmup:
            sync(rt.device)
            t0 = time.perf_counter()
        set_lr(opts, lr_at(i, total, cfg.optim))
        result = train_step(rt, iter([batches[i % len(batches)]]), 1, cfg.optim.grad_clip)
    sync(rt.device)
    seconds = time.perf_counter() - t0
    tokens = steps * cfg.train.micro_batch * cfg.data.seq_len
    return {"tokens_per_s": tokens / seconds, "step_s": seconds / steps, "loss": float(result.loss)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def one_rank_group():
    """A one-process torch.distributed group (FSDP2 and DeepSpeed need one), torn down afterwards."""
    import torch.distributed as dist

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------
# the parts: each returns a result dict (status ok unless it raises or says otherwise)
# ---------------------------------------------------------------------------------------------

def part_env(args) -> dict:
    import torch

    from kiln.metrics import device_peak_flops
    from kiln.model.attention import flash_attn_module

    device, _ = device_and_dtype(args.cpu)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else device_peak_flops(device)
    flash = flash_attn_module() is not None
    if flash:
        import flash_attn

        flash_text = f"flash-attn {flash_attn.__version__}"
    else:
        flash_text = "flash-attn not importable" + (f" ({args.flash_note})" if args.flash_note else "")
    cuda = torch.version.cuda or "none"
    bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else True
    mem = f", {torch.cuda.get_device_properties(device).total_memory / GIB:.0f} GiB" if device.type == "cuda" else ""
    return {"detail": f"{name}{mem}; torch {torch.__version__}, CUDA {cuda}; bf16 {bf16}; {flash_text}; "
                      f"bf16 peak {'unknown (MFU n/a; pass --peak-tflops)' if not peak else f'{peak / 1e12:.0f} TFLOP/s'}",
            "device": name, "flash_attn": flash, "peak_tflops": peak / 1e12 if peak else None}


def part_attention(args) -> dict:
    """Each backend against math computed in fp32 on the same bf16 inputs: outputs and input gradients."""
    import torch

    from kiln.model.attention import attention, flash_usable

    device, dtype = device_and_dtype(args.cpu)
    b, s, h, kv, d = (2, 64, 4, 2, 16) if args.cpu else (2, 2048, 32, 8, 64)
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(b, s, n, d, generator=g).to(device, dtype) for n in (h, kv, kv))
    docs = (torch.rand(b, s, generator=g) < 4 / s).long().cumsum(1).to(device)
    cases = {"causal": (None, None), "documents": (docs, None), "window": (None, s // 4)}
    backends = ["sdpa", "math"] + (["flash"] if flash_usable(device, dtype) else [])
    worst, rows = 0.0, []
    for case, (doc_ids, window) in cases.items():
        ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
        ref = attention(*ref_in, "math", doc_ids, window)
        ref_grads = torch.autograd.grad(ref, ref_in, ref.detach().cos())  # a fixed, non-trivial upstream grad
        for backend in backends:
            inp = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            out = attention(*inp, backend, doc_ids, window)
            grads = torch.autograd.grad(out, inp, ref.detach().cos().to(dtype))
            err = max([_rel(out, ref)] + [_rel(a, r) for a, r in zip(grads, ref_grads)])
            worst = max(worst, err)
            rows.append(f"{backend}/{case} {err:.1e}")
    ok = worst < args.attention_tol
    skipped = [] if "flash" in backends else ["flash: skipped (" + ("CPU" if args.cpu else "flash-attn not importable") + ")"]
    return {"status": "ok" if ok else "fail", "max_rel_err": worst,
            "detail": f"bf16 vs fp32 math, worst {worst:.1e} (tol {args.attention_tol:g}): " + ", ".join(rows + skipped)}


def _rel(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def part_checkpoint(args) -> dict:
    """Save after one step, load into a freshly built model and optimizer: every tensor equal, and the
    next step's loss identical to the uninterrupted run's."""
    import torch

    from kiln.checkpoint.manager import CheckpointManager
    from kiln.config import config_hash, to_yaml

    small = [] if args.cpu else ["model.n_layers=2"]  # the 1B's widths and vocabulary, two layers
    cfg = make_config(args, small + ["parallel.compile=false"])
    device, _ = device_and_dtype(args.cpu)
    batches = random_batches(cfg, device)
    rt, opts = build_runtime(cfg)
    train_steps(rt, opts, cfg, batches, steps=1, warmup=0)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = CheckpointManager(tmp, keep_last=1)
        t0 = time.perf_counter()
        ckpt.save(1, rt, {"tokens": 0, "config_hash": config_hash(cfg)}, None, 0, to_yaml(cfg))
        ckpt.wait()
        save_s = time.perf_counter() - t0
        saved = snapshot(rt, opts)
        expected = train_steps(rt, opts, cfg, batches, steps=1, warmup=0)["loss"]
        saved_at = ckpt.find_resumable()
        rt2, opts2 = build_runtime(cfg)
        t0 = time.perf_counter()
        ckpt.load(saved_at, rt2, config_hash(cfg))
        load_s = time.perf_counter() - t0
        loaded = snapshot(rt2, opts2)
        resumed = train_steps(rt2, opts2, cfg, batches, steps=1, warmup=0)["loss"]
    differ = [k for k in saved if k not in loaded or not torch.equal(saved[k], loaded[k])]
    same = resumed == expected and not differ and len(saved) == len(loaded)
    return {"status": "ok" if same else "fail", "save_s": save_s, "load_s": load_s,
            "detail": f"{len(saved)} model+AdamW tensors {'equal' if not differ else f'DIFFER: {differ[:3]}'}; "
                      f"save {save_s:.1f}s, load {load_s:.1f}s; next-step loss after load {resumed:.6f} vs "
                      f"uninterrupted {expected:.6f} ({'identical' if resumed == expected else 'DIFFERENT'})"}


def snapshot(rt, opts) -> dict:
    """Copies of every parameter and every AdamW state tensor, by name."""
    out = {}
    for part, opt in zip(rt.model_parts, opts):
        for name, p in part.named_parameters():
            out[name] = p.detach().clone()
            for key, value in opt.state.get(p, {}).items():
                out[f"{name}/{key}"] = value.detach().clone() if hasattr(value, "detach") else value
    return out


def part_fsdp2(args) -> dict:
    """kiln's apply_fsdp on a one-rank mesh (bf16 parameters, fp32 reduce), fused AdamW on DTensors."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from kiln.model import Transformer
    from kiln.optim import build_optimizer, lr_at, set_lr
    from kiln.parallel.parallelize import apply_fsdp, mixed_precision_dtype
    from kiln.parallel.runtime import cross_entropy

    cfg = make_config(args, [] if args.cpu else ["model.n_layers=4"])
    device, _ = device_and_dtype(args.cpu)
    batches = random_batches(cfg, device)
    reset_memory(device)
    with one_rank_group():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
        mesh = init_device_mesh(device.type, (1,), mesh_dim_names=("dp_shard",))
        torch.manual_seed(0)
        with torch.device(device):
            model = Transformer(cfg.model)
        param_dtype = mixed_precision_dtype(cfg, device)
        apply_fsdp(model, mesh, True, param_dtype)
        opt = build_optimizer(model, cfg.optim, device, distributed=True)
        steps, warmup = args.steps, 1
        for i in range(warmup + steps):
            if i == warmup:
                sync(device)
                t0 = time.perf_counter()
            set_lr([opt], lr_at(i, warmup + steps, cfg.optim))
            batch = batches[i % len(batches)]
            loss = cross_entropy(model(batch["input"]), batch["target"])
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(device)
        seconds = time.perf_counter() - t0
        loss, norm = float(loss), float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    fused = bool(opt.defaults.get("fused"))
    from kiln.model.attention import resolve_backend
    attention = resolve_backend(cfg.model.attention, device, param_dtype)
    tps = steps * cfg.train.micro_batch * cfg.data.seq_len / seconds
    ok = math.isfinite(loss) and math.isfinite(norm)
    return {"status": "ok" if ok else "fail", "tokens_per_s": tps, "peak_mem_gib": peak_memory_gib(device),
            "fused_adamw": fused, "precision": str(param_dtype).replace("torch.", ""), "attention": attention,
            "detail": f"{cfg.model.n_layers} layers, loss {loss:.3f}, grad norm {norm:.3f}, "
                      f"param dtype {param_dtype}, fused AdamW {fused}"}


def part_deepspeed(args) -> dict:
    """kiln's DeepSpeed engine (ZeRO-1, bf16 on GPU) for a few steps in one process."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return {"status": "skipped", "detail": "deepspeed not installed (pip install 'kiln[deepspeed]')"}
    cfg = make_config(args, ["parallel.engine=deepspeed", "parallel.zero_stage=1"]
                      + ([] if args.cpu else ["model.n_layers=4"]))
    device, _ = device_and_dtype(args.cpu)
    batches = random_batches(cfg, device)
    reset_memory(device)
    with one_rank_group():
        rt, opts = build_runtime(cfg)
        result = train_steps(rt, opts, cfg, batches, steps=args.steps, warmup=1)
    ok = math.isfinite(result["loss"])
    _, dtype = device_and_dtype(args.cpu)
    return {"status": "ok" if ok else "fail", **result, "peak_mem_gib": peak_memory_gib(device),
            **fast_paths(cfg, device, opts, dtype),
            "detail": f"ZeRO-1, {cfg.model.n_layers} layers, loss {result['loss']:.3f}"}


def part_throughput(args, attention: str, compiled: bool, ac: str) -> dict:
    from kiln.metrics import device_peak_flops, mfu
    from kiln.model import flops_per_token
    from kiln.model.attention import flash_usable

    device, dtype = device_and_dtype(args.cpu)
    if attention == "flash" and not flash_usable(device, dtype):
        why = "needs CUDA" if args.cpu else f"flash-attn not importable{f' ({args.flash_note})' if args.flash_note else ''}"
        return {"status": "skipped", "detail": why}
    cfg = make_config(args, [f"model.attention={attention}", f"parallel.compile={str(compiled).lower()}",
                             f"parallel.activation_checkpoint={ac}"])
    batches = random_batches(cfg, device)
    reset_memory(device)
    rt, opts = build_runtime(cfg)
    result = train_steps(rt, opts, cfg, batches, steps=args.steps, warmup=3 if compiled else 2)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else device_peak_flops(device)
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    util = mfu(result["tokens_per_s"], fpt, 1, peak)
    paths = fast_paths(cfg, device, opts, dtype)
    ok = math.isfinite(result["loss"])
    return {"status": "ok" if ok else "fail", **result, "mfu": util, "peak_mem_gib": peak_memory_gib(device),
            **paths, "detail": f"{cfg.model.name} b{cfg.train.micro_batch}x{cfg.data.seq_len}, "
                               f"{args.steps} steps, loss {result['loss']:.3f}"}


def run_part(name: str, args) -> dict:
    if args.cpu:  # the smoke test checks that compile traces kiln's blocks, not Inductor's C++ build time
        _compile_with("aot_eager")
    if name.startswith("tput-"):
        _, attention, mode, *rest = name.split("-")
        return part_throughput(args, attention, mode == "compile", "selective" if rest else "none")
    return {"env": part_env, "attention": part_attention, "checkpoint": part_checkpoint, "fsdp2": part_fsdp2,
            "deepspeed": part_deepspeed}[name](args)


def _compile_with(backend: str) -> None:
    import functools

    import torch

    if not getattr(torch.nn.Module.compile, "_kiln_smoke", False):
        original = torch.nn.Module.compile

        @functools.wraps(original)
        def compile_(self, *a, **kw):
            kw.setdefault("backend", backend)
            return original(self, *a, **kw)

        compile_._kiln_smoke = True
        torch.nn.Module.compile = compile_


# ---------------------------------------------------------------------------------------------
# orchestration: budget, per-part timeouts, results file, table
# ---------------------------------------------------------------------------------------------

def _in_process(name: str, args, timeout_s: float) -> dict:
    """--cpu: run here, under SIGALRM (a Python-level timeout; GPU parts get a process each)."""
    def expire(signum, frame):
        raise TimeoutError(f"timed out after {timeout_s:.0f}s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(max(1, int(timeout_s)))
    try:
        with contextlib.redirect_stdout(io.StringIO()) as quiet:
            result = run_part(name, args)
    except Exception as exc:
        return {"status": "timeout" if isinstance(exc, TimeoutError) else "fail",
                "detail": f"{type(exc).__name__}: {exc}".splitlines()[0][:300], "log": traceback.format_exc()[-2000:]}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    result.setdefault("status", "ok")
    result["log"] = quiet.getvalue()[-1000:]
    return result


def _in_subprocess(name: str, args, timeout_s: float) -> dict:
    """GPU: a fresh process per part (its memory, compile workers and any CUDA error die with it), killed
    with its whole process group at the timeout."""
    out = Path(args.out) / f"part-{name}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--part-result", str(out)] + _forward(args)
    log_path = Path(args.out) / f"part-{name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"status": "timeout", "detail": f"timed out after {timeout_s:.0f}s (log: {log_path.name})"}
    if out.is_file():
        return json.loads(out.read_text())
    tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
    return {"status": "fail", "detail": f"exit {proc.returncode}: {tail[0][:300]} (log: {log_path.name})"}


def _forward(args) -> list[str]:
    """The options a part's process needs from the orchestrator's command line."""
    out = ["--out", str(args.out), "--model", str(args.model), "--seq-len", str(args.seq_len),
           "--micro-batch", str(args.micro_batch), "--steps", str(args.steps),
           "--attention-tol", str(args.attention_tol)]
    if args.peak_tflops:
        out += ["--peak-tflops", str(args.peak_tflops)]
    if args.flash_note:
        out += ["--flash-note", args.flash_note]
    return out + (["--cpu"] if args.cpu else [])


def run_all(args) -> list[dict]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "results.jsonl"
    deadline = time.monotonic() + args.budget
    selected = [p for p in PARTS if not args.only or p.name in args.only]
    print(f"kiln gpu_check: {len(selected)} parts, budget {args.budget:.0f}s, results -> {jsonl}", flush=True)
    results = []
    for part in selected:
        left = deadline - time.monotonic() - args.reserve
        timeout_s = min(part.timeout_s, left)
        started = time.monotonic()
        if timeout_s < (part.min_s if not args.cpu else 1):
            result = {"status": "skipped", "detail": f"out of budget ({max(left, 0):.0f}s left, needs {part.min_s}s)"}
        elif args.cpu and not args.isolate:
            result = _in_process(part.name, args, timeout_s)
        else:
            result = _in_subprocess(part.name, args, timeout_s)
        result = {"part": part.name, **result, "seconds": round(time.monotonic() - started, 1)}
        with open(jsonl, "a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"  {part.name:<24} {result['status']:<8} {result['seconds']:6.1f}s  {result.get('detail', '')}",
              flush=True)
        results.append(result)
    table = format_table(results, args)
    (out / "table.md").write_text(table + "\n")
    print("\n" + table, flush=True)
    return results


def format_table(results: list[dict], args) -> str:
    def num(value, fmt):
        return "" if value is None else format(value, fmt)

    lines = [f"kiln gpu_check ({'CPU smoke: tiny shapes' if args.cpu else f'{Path(args.model).name}, batch {args.micro_batch}x{args.seq_len}, bf16'})",
             "",
             "| part | status | tokens/s | MFU | peak mem GiB | attention | compile | fused AdamW | seconds | detail |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        mfu = r.get("mfu")
        lines.append(
            f"| {r['part']} | {r['status']} | {num(r.get('tokens_per_s'), ',.0f')} | "
            f"{'' if 'tokens_per_s' not in r else ('n/a' if mfu is None else f'{100 * mfu:.1f}%')} | "
            f"{num(r.get('peak_mem_gib'), '.1f')} | {r.get('attention', '')} | {_flag(r.get('compile'))} | "
            f"{_flag(r.get('fused_adamw'))} | {r['seconds']} | {str(r.get('detail', '')).replace('|', '/')} |")
    return "\n".join(lines)


def _flag(value) -> str:
    return "" if value is None else ("on" if value else "off")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="smoke mode: every part on CPU with tiny shapes")
    ap.add_argument("--out", default=None, help="results directory (default: $OUT, else ./gpu_check_results)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for all parts (default 450; 120 with --cpu)")
    ap.add_argument("--reserve", type=float, default=5.0, help="seconds kept back for the table")
    ap.add_argument("--only", nargs="*", default=None, help="run only these parts (names as in the table)")
    ap.add_argument("--model", default=str(ROOT / "configs/model/1b.yaml"))
    ap.add_argument("--seq-len", type=int, default=None, help="default 2048 (32 with --cpu)")
    ap.add_argument("--micro-batch", type=int, default=None, help="default 4 (2 with --cpu)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run (default 20; 2 with --cpu)")
    ap.add_argument("--attention-tol", type=float, default=2e-2, help="max relative error vs fp32 math")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak when kiln's table lacks the GPU")
    ap.add_argument("--flash-note", default="", help="why flash-attn is missing (set by gpu_check.sh)")
    ap.add_argument("--isolate", action="store_true", help="a process per part in --cpu mode too (as on the GPU)")
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--part-result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.out = args.out or os.environ.get("OUT") or "gpu_check_results"
    args.budget = (120.0 if args.cpu else 450.0) if args.budget is None else max(args.budget, 0.0)
    args.seq_len = args.seq_len or (32 if args.cpu else 2048)
    args.micro_batch = args.micro_batch or (2 if args.cpu else 4)
    args.steps = args.steps or (2 if args.cpu else 20)
    known = {p.name for p in PARTS}
    bad = [n for n in (args.only or []) + ([args.part] if args.part else []) if n not in known]
    if bad:
        ap.error(f"unknown part {bad[0]!r}; parts: {', '.join(sorted(known))}")
    if not args.cpu:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: this torch sees no CUDA device; run with --cpu for the smoke mode", file=sys.stderr)
            return 2
    if args.part:  # one part, in its own process (called by run_all)
        try:
            result = run_part(args.part, args)
            result.setdefault("status", "ok")
        except Exception as exc:
            traceback.print_exc()
            result = {"status": "fail", "detail": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
        Path(args.part_result).write_text(json.dumps(result))
        sys.stdout.flush()
        os._exit(0)  # skip interpreter teardown (NCCL/gloo groups, compile workers)
    results = run_all(args)
    return 0 if all(r["status"] in ("ok", "skipped") for r in results) else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # a process group destroyed in --cpu mode can still abort gloo's teardown
