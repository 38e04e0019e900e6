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
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import bmc  # noqa: E402
from bmc import zoo  # noqa: E402
from bmc.local_ranks import run_ranks  # noqa: E402


def model_config(args):
    return dataclasses.replace(zoo.config("gpt-mini"), n_layer=args.layers, n_embd=args.width,
                               n_head=args.width // 64, block_size=args.seq, bias=False)


def batches(args, world_size):
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (args.batch, args.seq + 1), generator=gen)
            for _ in range(args.warmup + args.steps)]


def storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def timed_steps(args, step) -> list[float]:
    times = []
    for i, batch in enumerate(batches(args, dist.get_world_size())):
        dist.barrier()
        start = time.perf_counter()
        step(batch[:, :-1], batch[:, 1:])
        dist.barrier()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def run_fsdp2(rank, world_size, args):
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    model = zoo.build(model_config(args))
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(x, y):
        opt.zero_grad()
        model(x, y).backward()
        opt.step()

    times = timed_steps(args, step)
    params = list(model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    states = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    held = storage_bytes(params) + storage_bytes(grads) + storage_bytes(states)
    return times, held, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_bmc(rank, world_size, args, pipeline):
    model = zoo.build(model_config(args))
    x = torch.zeros(args.batch, args.seq, dtype=torch.long)
    prog = bmc.compile(model, passes=pipeline, example_inputs=(x, x.clone()), world_size=world_size)
    opt = prog.optimizer(torch.optim.AdamW, lr=1e-3)

    def step(x, y):
        opt.zero_grad()
        prog(x, y).backward()
        opt.step()

    times = timed_steps(args, step)
    held = sum(opt.memory().values())
    return times, held, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def summarize(results):
    """Median step time of the slowest rank; model-state bytes and peak RSS of the largest rank."""
    step = max(statistics.median(times) for times, _, _ in results)
    held = max(h for _, h, _ in results)
    rss = max(r for _, _, r in results) * 1024
    return step, held, rss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="per rank")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    runs = {
        "fsdp2 (fully_shard per block)": (run_fsdp2, ()),
        "bmc zero3": (run_bmc, ("zero3",)),
        "bmc zero3, no prefetch": (run_bmc, ("zero{stage=3,prefetch=0}",)),
        "bmc zero3,ckpt": (run_bmc, ("zero3,ckpt",)),
        "bmc dp": (run_bmc, ("dp",)),
        "bmc dp,ckpt": (run_bmc, ("dp,ckpt",)),
    }
    rows = {}
    for name, (fn, extra) in runs.items():
        rows[name] = summarize(run_ranks(args.ranks, fn, args, *extra, timeout=1800))
    params = zoo.param_count(model_config(args))
    print(f"bmc training benchmark: {args.ranks} gloo ranks, GPT {args.layers}x{args.width} "
          f"({params / 1e6:.1f}M params, no biases), batch {args.batch} x seq {args.seq} per rank, fp32 AdamW")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"{'run':<32}{'step time':>12}{'model states':>15}{'peak RSS':>12}")
    for name, (step, held, rss) in rows.items():
        print(f"{name:<32}{step * 1e3:>10.1f}ms{held / 1e6:>13.2f}MB{rss / 1e6:>10.0f}MB")
    fsdp, zero3 = rows["fsdp2 (fully_shard per block)"], rows["bmc zero3"]
    print(f"zero3 / FSDP2 step time: {zero3[0] / fsdp[0]:.2f}x   model states: {zero3[1] / fsdp[1]:.2f}x   "
          f"peak RSS: {zero3[2] / fsdp[2]:.2f}x")
    print(f"zero3,ckpt / zero3 step time: {rows['bmc zero3,ckpt'][0] / zero3[0]:.2f}x   "
          f"dp,ckpt / dp step time: {rows['bmc dp,ckpt'][0] / rows['bmc dp'][0]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
