#!/usr/bin/env python3
"""Per-rank resident parameter bytes of a tensor-parallel program, measured after a fresh
process loads it from a .pt2 archive, beside the bound: 1/T of the weights the plan splits
plus the replicated ones.

    python tools/bench/tp_memory.py                   # gpt-mini and llama-mini, tp=2 and tp=4
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import bmc  # noqa: E402
from bmc import ir  # noqa: E402
from bmc.analysis.measure import resident_parameter_bytes, tensor_parallel_bound  # noqa: E402
from bmc.cli.local_ranks import run_ranks  # noqa: E402
from bmc.ir.serialize import save_pt2  # noqa: E402
from bmc.models import zoo  # noqa: E402
from bmc.passmgr import PassContext, PassManager  # noqa: E402


def _loaded_bytes(rank, world, path):
    prog = bmc.load(path)
    gc.collect()
    return resident_parameter_bytes(prog.graph_module)


def measure(model_name: str, degree: int, directory: str) -> dict:
    model = zoo.build(model_name)
    pipeline = f"tp{{degree={degree}}},insert-collectives"
    gm = bmc.trace(model, model.example_inputs(), dynamic=True)
    planned = PassManager(pipeline, context=PassContext(world_size=degree)).run(gm).graph_module
    path = os.path.join(directory, f"{model_name}-tp{degree}.pt2")
    save_pt2(planned, path, pipeline=pipeline)
    split = set(ir.get_plan(planned, ir.TensorParallelPlan).split_params)
    whole = resident_parameter_bytes(zoo.build(model_name))
    bound = tensor_parallel_bound(zoo.build(model_name), split, degree)
    held = max(run_ranks(degree, _loaded_bytes, path))
    return {"model": model_name, "tp": degree, "whole": whole, "bound": bound, "held": held}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt-mini,llama-mini")
    parser.add_argument("--degrees", default="2,4")
    args = parser.parse_args(argv)
    print(f"{'model':<12}{'tp':>3}{'whole model':>14}{'bound/rank':>13}{'held/rank':>12}{'held/bound':>12}")
    with tempfile.TemporaryDirectory() as directory:
        for name in args.models.split(","):
            for degree in map(int, args.degrees.split(",")):
                try:
                    r = measure(name, degree, directory)
                except bmc.PipelineError as exc:  # e.g. 2 kv heads do not split 4 ways
                    print(f"{name:<12}{degree:>3}  not splittable: {exc}")
                    continue
                print(f"{r['model']:<12}{r['tp']:>3}{r['whole']:>14,}{r['bound']:>13,}{r['held']:>12,}"
                      f"{r['held'] / r['bound']:>12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
