"""Throughput of each parallel layout relative to DP-only (FSDP) at the same process count.

    python bench/parallel.py                      # the ~20M `small` model, 2 and 4 CPU processes
    python bench/parallel.py --nproc 2 --steps 2 --seq 128
    python bench/parallel.py --cp --seq 1024      # context parallelism (ring attention) vs no CP

Every layout runs in the same spawned process group, one after another, on the same machine in
the same run, so the printed ratios (tokens/s divided by DP-only's) compare like with like.
Tokens are counted once per DP replica (TP, PP and CP peers share a batch). On a CPU box with fewer
cores than processes the absolute numbers mean little; the ratios show communication overhead.
With --cp, each sequence is split over the cp ranks instead of each rank holding whole sequences:
CP overhead is DP-only's tokens/s over CP's at the same process count and sequence length. The
"math attention" row isolates the kernel: the ring computes its blocks with fp32 matmuls (as the
math backend does), so CP vs that row is the ring's own cost (communication, merging, load balance).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

LAYOUTS = {
    2: {"dp2 (fsdp)": "", "tp2": "parallel.tp=2 parallel.sequence_parallel=false",
        "tp2+sp": "parallel.tp=2", "pp2 1f1b": "parallel.pp=2 parallel.pp_microbatches=4",
        "pp2 gpipe": "parallel.pp=2 parallel.pp_schedule=gpipe parallel.pp_microbatches=4"},
    4: {"dp4 (fsdp)": "", "hsdp 2x2": "parallel.dp_replicate=2 parallel.dp_shard=2",
        "dp2 x tp2": "parallel.tp=2", "dp2 x pp2": "parallel.pp=2 parallel.pp_microbatches=4",
        "pp2 x tp2": "parallel.pp=2 parallel.tp=2 parallel.pp_microbatches=4"},
}
CP_LAYOUTS = {
    2: {"dp2 (fsdp)": "", "dp2 math attention": "model.attention=math", "cp2": "parallel.cp=2"},
    4: {"dp4 (fsdp)": "", "dp4 math attention": "model.attention=math", "dp2 x cp2": "parallel.cp=2",
        "cp4": "parallel.cp=4", "cp2 x tp2": "parallel.cp=2 parallel.tp=2"},
}


def worker(rank: int, world: int, port: int, args, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    from kiln.config import load_config
    from kiln.model.llama import Transformer
    from kiln.parallel import setup_parallel
    from kiln.train import train_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {}
    for name, overrides in (CP_LAYOUTS if args.cp else LAYOUTS)[world].items():
        cfg = load_config(["configs/model/small.yaml"], [
            f"data.seq_len={args.seq}", f"train.micro_batch={args.micro_batch}", "train.device=cpu",
            "data.synthetic=markov", "model.attention=sdpa", *overrides.split()])
        with torch.device("meta"):
            model = Transformer(cfg.model)
        rt = setup_parallel(cfg, model, world, rank)
        rt.build_optimizers(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4, foreach=True))
        gen = torch.Generator().manual_seed(rt.dp_rank)
        tokens = torch.randint(0, cfg.model.vocab_size, (args.micro_batch, args.seq + 1), generator=gen)
        batch = {"input": tokens[:, :-1], "target": tokens[:, 1:]}
        for step in range(args.steps + 1):  # step 0 warms up (pipeline shape inference, allocator)
            if step == 1:
                dist.barrier()
                start = time.perf_counter()
            train_step(rt, iter([batch]), 1, 1.0)
        dist.barrier()
        elapsed = time.perf_counter() - start
        results[name] = args.steps * args.micro_batch * args.seq * rt.dp_size / elapsed
        del rt
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, nargs="+", default=[2, 4], choices=sorted(LAYOUTS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--cp", action="store_true", help="context parallelism (ring attention) vs DP-only")
    args = parser.parse_args()
    os.chdir(Path(__file__).resolve().parent.parent)
    import torch.multiprocessing as mp

    os.environ["OMP_NUM_THREADS"] = "1"
    print(f"model: configs/model/small.yaml, seq {args.seq}, micro-batch {args.micro_batch} per DP rank, "
          f"{args.steps} timed steps, CPU gloo, {os.cpu_count()} cores")
    for world in args.nproc:
        out = tempfile.mktemp(suffix=".json")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(worker, args=(world, port, args, out), nprocs=world, join=True)
        results = json.loads(Path(out).read_text())
        base_name = next(iter(results))
        base = results[base_name]
        print(f"\n{world} processes (reference: {base_name})"
              + (f"; CP overhead = reference tokens/s / CP tokens/s" if args.cp else ""))
        print(f"  {'layout':<20} {'tokens/s':>10} {'vs DP-only':>11}")
        for name, tps in results.items():
            extra = f"   overhead {base / tps:.2f}x" if args.cp and "cp" in name else ""
            print(f"  {name:<20} {tps:>10.0f} {tps / base:>10.2f}x{extra}")


if __name__ == "__main__":
    main()
