#!/usr/bin/env python3
"""Training benchmark: bmc zero3 against FSDP2 (fully_shard per block, same model, batch and
dtype) on N gloo ranks in one run, and bmc's ckpt against no recompute.

    python tools/bench/train.py                 # defaults: 2 ranks, gpt 8x256, batch 8 x seq 128
    python tools/bench/train.py --steps 10 --layers 12

Prints the step time (median over timed steps, slowest rank) and the per-rank model-state bytes
(weights + gradients + optimizer states actually held, after a step) of each, and the ratios.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import bmc  # noqa: E402
from bmc.models import zoo  # noqa: E402
from bmc.backends.optimizer import storage_bytes  # noqa: E402
from bmc.cli.local_ranks import run_ranks  # noqa: E402


def model_config(args):
    return dataclasses.replace(zoo.config("gpt-mini"), n_layer=args.layers, n_embd=args.width,
                               n_head=args.width // 64, block_size=args.seq, bias=False)


def batches(args, world_size):
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (args.batch, args.seq + 1), generator=gen)
            for _ in range(args.warmup + args.steps)]


def build_fsdp2(args):
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    model = zoo.build(model_config(args))
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def memory():
        params = list(model.parameters())
        grads = [p.grad for p in params if p.grad is not None]
        states = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
        # FSDP2's tensors are DTensors: count each local shard's storage
        return storage_bytes([t.to_local() if hasattr(t, "to_local") else t for t in params + grads + states])
    return model, opt, memory


def build_bmc(args, pipeline, world_size):
    torch.manual_seed(0)
    model = zoo.build(model_config(args))
    x = torch.zeros(args.batch, args.seq, dtype=torch.long)
    prog = bmc.compile(model, passes=pipeline, example_inputs=(x, x.clone()), world_size=world_size)
    opt = prog.optimizer(torch.optim.AdamW, lr=1e-3)
    return prog, opt, lambda: sum(opt.memory().values())


def run_interleaved(rank, world_size, args, runs):
    """Every run's model lives in the same processes and their steps alternate (in a rotating
    order), so the machine's drift over time affects each run alike; the time of one step
    is the slowest rank's (barriers around it)."""
    built = {name: (build_fsdp2(args) if pipeline == "fsdp2" else build_bmc(args, pipeline, world_size))
             for name, pipeline in runs.items()}
    times = {name: [] for name in runs}
    names = list(runs)
    for i, batch in enumerate(batches(args, world_size)):
        x, y = batch[:, :-1], batch[:, 1:]
        for name in names[i % len(names):] + names[:i % len(names)]:
            model, opt, _ = built[name]
            dist.barrier()
            start = time.perf_counter()
            opt.zero_grad()
            model(x, y).backward()
            opt.step()
            dist.barrier()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    return {name: (times[name], built[name][2]()) for name in runs}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss(rank, world_size, args, pipeline):
    """Training memory of a process that trains only this run (separate processes: RSS
    cannot be split between runs that share one): the peak resident bytes while stepping,
    sampled every millisecond, above the resident bytes once the model is built (so the
    libraries each side imports and its setup do not count)."""
    import threading
    model, opt, _ = build_fsdp2(args) if pipeline == "fsdp2" else build_bmc(args, pipeline, world_size)
    baseline, peak, stop = _rss(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for batch in batches(args, world_size)[:3]:
        opt.zero_grad()
        model(batch[:, :-1], batch[:, 1:]).backward()
        opt.step()
    stop.set()
    sampler.join()
    return peak[0] - baseline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="per rank")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rss", action="store_true",
                        help="also measure each run's training RSS (peak while stepping, above the built model) "
                             "in its own processes")
    args = parser.parse_args()
    runs = {"fsdp2 (fully_shard per block)": "fsdp2", "bmc zero3": "zero3", "bmc zero3,ckpt": "zero3,ckpt",
            "bmc dp": "dp", "bmc dp,ckpt": "dp,ckpt"}
    results = run_ranks(args.ranks, run_interleaved, args, runs, timeout=3600)
    rss = {name: max(run_ranks(args.ranks, peak_rss, args, pipeline, timeout=1800)) for name, pipeline in runs.items()} \
        if args.rss else {}
    params = zoo.param_count(model_config(args))
    print(f"bmc training benchmark: {args.ranks} gloo ranks, GPT {args.layers}x{args.width} "
          f"({params / 1e6:.1f}M params, no biases), batch {args.batch} x seq {args.seq} per rank, fp32 AdamW; "
          f"{args.steps} timed steps per run, interleaved")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"{'run':<32}{'median step':>12}{'min step':>10}{'model states':>15}{'train RSS':>11}")
    step = {}
    for name in runs:
        per_rank = [r[name] for r in results]
        # the slowest rank's time of each step (they are equal up to the barrier), then the median
        slowest = [max(ts) for ts in zip(*[times for times, _ in per_rank])]
        step[name] = statistics.median(slowest)
        held = max(h for _, h in per_rank)
        rss_text = f"{rss[name] / 1e6:>9.0f}MB" if rss else f"{'-':>11}"
        print(f"{name:<32}{step[name] * 1e3:>10.1f}ms{min(slowest) * 1e3:>8.1f}ms{held / 1e6:>13.2f}MB{rss_text}")
        step[name, "held"] = held
    fsdp, zero3 = "fsdp2 (fully_shard per block)", "bmc zero3"
    line = (f"zero3 / FSDP2 step time: {step[zero3] / step[fsdp]:.2f}x   "
            f"model states: {step[zero3, 'held'] / step[fsdp, 'held']:.2f}x")
    if rss:
        line += f"   training RSS: {rss[zero3] / rss[fsdp]:.2f}x"
    print(line)
    print(f"zero3,ckpt / zero3 step time: {step['bmc zero3,ckpt'] / step[zero3]:.2f}x   "
          f"dp,ckpt / dp step time: {step['bmc dp,ckpt'] / step['bmc dp']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
