#!/usr/bin/env python3
"""Parallelism benchmark: bmc tp against DTensor's parallelize_module (Colwise/Rowwise plan),
and bmc pp against torch.distributed.pipelining's pipeline() + the same schedule and split,
each pair in the same processes with their steps interleaved, on gloo ranks.

    python tools/bench/parallel.py                      # LLaMA 8x256, batch 8 x seq 128, 2 ranks
    python tools/bench/parallel.py --steps 10 --schedule gpipe

A step is forward + backward + AdamW on the same model, batch and dtype; the time of a step
is the slowest rank's (barriers around it), and the figure is the median over timed steps.
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
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import bmc  # noqa: E402
from bmc import ir  # noqa: E402
from bmc.models import zoo  # noqa: E402
from bmc.cli.local_ranks import run_ranks  # noqa: E402


def model_config(args):
    return dataclasses.replace(zoo.config("llama-mini"), n_layer=args.layers, dim=args.width,
                               n_head=args.width // 32, n_kv_head=args.width // 64, ffn_dim=args.width * 8 // 3 // 8 * 8,
                               max_seq=args.seq)


def build_model():
    return zoo.build(MODEL)


def batches(args):
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (args.batch, args.seq + 1), generator=gen) for _ in range(args.warmup + args.steps)]


def cross_entropy(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


# ------------------------------------------------------------------ tensor parallel


def dtensor_tp(args, world):
    """The torchtitan-style plan: q/k/v and gate/up column-wise, o and down row-wise; the
    attention's head counts made local, as torchtitan does for its own model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = build_model()
    plan = {}
    for i, layer in enumerate(model.model.layers):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[f"model.layers.{i}.{name}"] = ColwiseParallel()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"model.layers.{i}.{name}"] = RowwiseParallel()
        layer.self_attn.n_head //= world
        layer.self_attn.n_kv_head //= world
    parallelize_module(model, mesh, plan)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(x, y):
        opt.zero_grad()
        loss = model(x, y)
        loss.backward()
        opt.step()
        return loss.item()
    return step


def bmc_tp(args, world):
    torch.manual_seed(0)
    model = build_model()
    x = torch.zeros(args.batch, args.seq, dtype=torch.long)
    prog = bmc.compile(model, passes=f"tp{{degree={world}}},insert-collectives", example_inputs=(x, x.clone()), world_size=world)
    opt = prog.optimizer(torch.optim.AdamW, lr=1e-3)

    def step(x, y):
        opt.zero_grad()
        loss = prog(x, y)
        loss.backward()
        opt.step()
        return loss.item()
    return step


# ------------------------------------------------------------------ pipeline parallel


def _pp_split(args, world):
    """bmc's cut for this model (the anchor gets the same one): the first block of each stage."""
    torch.manual_seed(0)
    model = build_model()
    x = torch.zeros(args.batch // args.microbatches, args.seq, dtype=torch.long)
    from bmc.passmgr.manager import PassManager
    gm = PassManager(_pp_pipeline(args, world)).run(bmc.trace(model, (x,))).graph_module
    return list(ir.get_plan(gm, ir.PipelinePlan).bounds[1:-1])


def _pp_pipeline(args, world):
    return f"pp{{stages={world},schedule={args.schedule},microbatches={args.microbatches}}}"


def pipelining_pp(args, world, firsts):
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, SplitPoint, pipeline
    torch.manual_seed(0)
    model = build_model()
    x = torch.zeros(args.batch // args.microbatches, args.seq, dtype=torch.long)
    pipe = pipeline(model, mb_args=(x,), split_spec={f"model.layers.{b}": SplitPoint.BEGINNING for b in firsts})
    rank = dist.get_rank()
    stage = pipe.build_stage(rank, torch.device("cpu"))
    cls = ScheduleGPipe if args.schedule == "gpipe" else Schedule1F1B
    schedule = cls(stage, args.microbatches, loss_fn=cross_entropy)
    opt = torch.optim.AdamW(stage.submod.parameters(), lr=1e-3)

    def step(x, y):
        opt.zero_grad()
        losses = []
        if rank == 0:
            schedule.step(x)
        elif rank == world - 1:
            schedule.step(target=y, losses=losses)
        else:
            schedule.step()
        opt.step()
        loss = torch.stack(losses).mean() if losses else torch.zeros(())
        dist.broadcast(loss, src=world - 1)
        return loss.item()
    return step


def bmc_pp(args, world):
    torch.manual_seed(0)
    model = build_model()
    x = torch.zeros(args.batch // args.microbatches, args.seq, dtype=torch.long)
    prog = bmc.compile(model, passes=_pp_pipeline(args, world), example_inputs=(x,), world_size=world)
    opt = prog.optimizer(torch.optim.AdamW, lr=1e-3)

    def step(x, y):
        opt.zero_grad()
        loss = prog.step(x, target=y, loss_fn=cross_entropy)
        opt.step()
        return loss.item()
    return step


# ------------------------------------------------------------------ timing


def run_interleaved(rank, world, args, kind, firsts):
    if kind == "tp":
        runs = {"DTensor parallelize_module": dtensor_tp(args, world), "bmc tp": bmc_tp(args, world)}
    else:
        runs = {"pipelining pipeline()+schedule": pipelining_pp(args, world, firsts), "bmc pp": bmc_pp(args, world)}
    times = {name: [] for name in runs}
    losses = {name: [] for name in runs}
    names = list(runs)
    for i, batch in enumerate(batches(args)):
        x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        for name in names[i % 2:] + names[:i % 2]:
            dist.barrier()
            start = time.perf_counter()
            losses[name].append(runs[name](x, y))
            dist.barrier()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    return times, losses


def median_of_slowest(results, name):
    return statistics.median(max(ts) for ts in zip(*[times[name] for times, _ in results]))


MODEL = None


def main() -> int:
    global MODEL
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="per step (tp: every rank's; pp: split into microbatches)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--schedule", choices=("gpipe", "1f1b"), default="1f1b")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", choices=("tp", "pp"), default=None)
    args = parser.parse_args()
    MODEL = model_config(args)
    params = zoo.param_count(MODEL)
    print(f"bmc parallelism benchmark: {args.ranks} gloo ranks, LLaMA {args.layers}x{args.width} "
          f"({params / 1e6:.1f}M params), batch {args.batch} x seq {args.seq}, fp32 AdamW; "
          f"{args.steps} timed steps per run, interleaved")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    kinds = [args.only] if args.only else ["tp", "pp"]
    for kind in kinds:
        firsts = _pp_split(args, args.ranks) if kind == "pp" else None
        results = run_ranks(args.ranks, _worker, args, kind, firsts, MODEL, timeout=3600)
        names = list(results[0][0])
        losses = results[0][1]
        anchor, ours = names
        t_anchor, t_ours = median_of_slowest(results, anchor), median_of_slowest(results, ours)
        detail = f" ({args.schedule}, {args.microbatches} microbatches, stages start at blocks {firsts})" \
            if kind == "pp" else ""
        print(f"{kind}{detail}:")
        print(f"  {anchor:<34}{t_anchor * 1e3:>9.1f} ms/step")
        print(f"  {ours:<34}{t_ours * 1e3:>9.1f} ms/step")
        print(f"  {ours} / {anchor.split()[0]}: {t_ours / t_anchor:.2f}x   (same computation: losses of the "
              f"last step {losses[anchor][-1]:.6f} and {losses[ours][-1]:.6f})")
    return 0


def _worker(rank, world, args, kind, firsts, model_cfg):
    global MODEL
    MODEL = model_cfg  # spawned processes start without main()'s globals
    return run_interleaved(rank, world, args, kind, firsts)


if __name__ == "__main__":
    sys.exit(main())
