#!/usr/bin/env python3
"""Compression benchmark: latency and size of the trained zoo gpt-mini before and after bmc's
pruning and int8 passes (torch backend), beside torch's own quantize_dynamic as the anchor,
with the held-out perplexity of each.

    OMP_NUM_THREADS=1 python tools/bench/compress.py        # batch 8 x seq 128, 5 warm-up + 30 timed forwards
    python tools/bench/compress.py --threads 2 --runs 50

Latency is one no-grad forward of a fixed batch of token ids. Every round times each variant
once, starting at a different one each round, so the machine's drift over the run hits all of
them alike; the figure is the median over the rounds, +- half the interquartile range.

Size is the bytes of the distinct tensors a variant holds (int8 weights, their scales and
torch's packed weights included) and its weight count (int8 weights count, their scales do
not). Perplexity and cosine of the logits are bmc.evaluate's: 32 held-out windows of the
standard library's sources. Every ratio is against the original eager model, in the same run.

The anchor is torch.ao.quantization.quantize_dynamic (nn.Linear -> dynamic int8, per output
channel: the granularity of bmc's per-row scales) on the same layers bmc quantizes: every
Linear but the tied output head. It works with torch 2.13's cpu build (fbgemm), with
deprecation warnings pointing at torchao, which are silenced here.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
import warnings

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import bmc  # noqa: E402
from bmc.compress import evaluate
from bmc.models import trained
from bmc.models import zoo  # noqa: E402

MODEL = "gpt-mini"
ORIGINAL = "original (eager fp32)"
ANCHOR = "torch quantize_dynamic (anchor)"
PIPELINES = {
    "bmc graph, no passes": "",
    "prune-heads{ratio=0.5}": "prune-heads{ratio=0.5}",
    "prune-layers{ratio=0.25}": "prune-layers{ratio=0.25}",
    "quant-int8 (per row, weight-only)": "quant-int8",
    "quant-int8{act=dynamic}": "quant-int8{act=dynamic}",
    "all three combined": "prune-heads{ratio=0.5},prune-layers{ratio=0.25},quant-int8",
}


def load_model(weights: str) -> nn.Module:
    if weights == "random":
        return zoo.build(MODEL).eval()
    return trained.load(MODEL)


def bmc_variant(model: nn.Module, pipeline: str, x: torch.Tensor):
    # a copy per variant: passes rewrite the traced graph, whose parameters are the model's own
    return bmc.compile(copy.deepcopy(model), passes=pipeline or (), example_inputs=(x,), dynamic=True)


def anchor_variant(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    # the layers bmc's quant-int8 quantizes by default: all Linear but the head tied to wte
    spec = {name: per_channel_dynamic_qconfig for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name != "lm_head"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices (moved to torchao)
        return quantize_dynamic(copy.deepcopy(model), spec, dtype=torch.qint8)


# ------------------------------------------------------------------ size


def _state_tensors(module: nn.Module):
    """Every tensor the module's state holds; torch's quantized Linear keeps (weight, bias) packed."""
    for value in module.state_dict(keep_vars=True).values():
        for item in (value if isinstance(value, tuple) else (value,)):
            if isinstance(item, torch.Tensor):
                yield item


def _quantized_bytes(t: torch.Tensor) -> int:
    if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        scales, zeros = t.q_per_channel_scales(), t.q_per_channel_zero_points()
        extra = scales.numel() * scales.element_size() + zeros.numel() * zeros.element_size()
    else:
        extra = 16  # one double scale, one int64 zero point
    return t.numel() * t.element_size() + extra


def size_of(module: nn.Module) -> tuple[int, int]:
    """(weights, bytes): weights count parameters and int8/qint8 weights, bytes every distinct
    tensor (tied weights once)."""
    seen, weights, nbytes = set(), 0, 0
    for t in _state_tensors(module):
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        if t.is_quantized:
            weights, nbytes = weights + t.numel(), nbytes + _quantized_bytes(t)
            continue
        nbytes += t.numel() * t.element_size()
        if isinstance(t, nn.Parameter) or t.dtype == torch.int8:
            weights += t.numel()
    return weights, nbytes


# ------------------------------------------------------------------ latency


@torch.no_grad()
def median_latency(runners: dict, x: torch.Tensor, warmup: int, runs: int) -> dict[str, tuple[float, float]]:
    for run in runners.values():
        for _ in range(warmup):
            run(x)
    names, times = list(runners), {name: [] for name in runners}
    for round_ in range(runs):
        start = round_ % len(names)
        for name in names[start:] + names[:start]:
            t0 = time.perf_counter()
            runners[name](x)
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(values), _spread(values)) for name, values in times.items()}


def _spread(values: list[float]) -> float:
    """Half the interquartile range: how much the VM's noise moves a figure."""
    q1, _, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / 2


# ------------------------------------------------------------------ report


def row(name: str, run, latency: tuple[float, float], reference: nn.Module, held_out, batch: int) -> dict:
    weights, nbytes = size_of(getattr(run, "graph_module", run))
    return {"name": name, "ms": latency[0] * 1e3, "spread": latency[1] * 1e3, "bytes": nbytes, "weights": weights,
            "ppl": evaluate.perplexity(run, held_out, batch), "cos": evaluate.cosine(run, reference, held_out, batch)}


def table(rows: list[dict]) -> str:
    base = rows[0]
    lines = ["| variant | latency | x | weight bytes | x | weights | x | perplexity | change | cosine |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['ms']:.1f} ± {r['spread']:.1f} ms | **{r['ms'] / base['ms']:.2f}x** "
                     f"| {r['bytes']:,} | {r['bytes'] / base['bytes']:.2f}x "
                     f"| {r['weights']:,} | {r['weights'] / base['weights']:.2f}x "
                     f"| {r['ppl']:.4f} | {(r['ppl'] / base['ppl'] - 1) * 100:+.2f}% | {r['cos']:.5f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--weights", choices=("trained", "random"), default="trained",
                        help="the trained checkpoint (bmc/assets) or seeded random init")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.weights)
    x = torch.randint(0, 256, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    runners = {ORIGINAL: model}
    for name, pipeline in PIPELINES.items():
        runners[name] = bmc_variant(model, pipeline, x)
    runners[ANCHOR] = anchor_variant(model)
    latency = median_latency(runners, x, args.warmup, args.runs)
    held_out = evaluate.EvalData.held_out(seq=args.seq)
    rows = [row(name, run, latency[name], model, held_out, args.batch) for name, run in runners.items()]
    print(f"{MODEL} ({args.weights} weights), forward of batch {args.batch} x seq {args.seq}, median of "
          f"{args.runs} rounds after {args.warmup} warm-up, {args.threads} thread(s); torch {torch.__version__}, "
          f"{platform.machine()}, {os.cpu_count()} cpus; held-out: {held_out.windows.shape[0]} windows of {args.seq}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
