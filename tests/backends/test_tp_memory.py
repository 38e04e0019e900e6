"""A tensor-parallel rank holds only its slices: per-rank resident parameter bytes of a
program loaded from a .pt2 archive are at most 1/T of the split weights plus the replicated
ones (+5%), at tp=2 and tp=4."""
import gc

import pytest

import bmc
from bmc import ir
from bmc.analysis.measure import resident_parameter_bytes, tensor_parallel_bound
from bmc.cli.local_ranks import run_ranks
from bmc.ir.serialize import save_pt2
from bmc.models import zoo
from bmc.passmgr import PassContext, PassManager


def _loaded_bytes(rank, world, path):
    prog = bmc.load(path)
    gc.collect()
    return resident_parameter_bytes(prog.graph_module)


@pytest.mark.parametrize("degree", [2, pytest.param(4, marks=pytest.mark.slow)])  # 4 ranks: -m slow
def test_each_tp_rank_holds_its_slices_only(degree, tmp_path):
    model = zoo.build("gpt-mini")
    path = str(tmp_path / "tp.pt2")
    # planned, not lowered (as bmc-opt -o writes it): the archive holds the whole weights
    pipeline = f"tp{{degree={degree}}},insert-collectives"
    planned = PassManager(pipeline, context=PassContext(world_size=degree)).run(
        bmc.trace(model, model.example_inputs(), dynamic=True)).graph_module
    save_pt2(planned, path, pipeline=pipeline)
    split = set(ir.get_plan(planned, ir.TensorParallelPlan).split_params)
    bound = tensor_parallel_bound(zoo.build("gpt-mini"), split, degree)
    whole = resident_parameter_bytes(zoo.build("gpt-mini"))
    held = run_ranks(degree, _loaded_bytes, path)
    assert all(b <= bound * 1.05 for b in held), (held, bound)
    assert max(held) < whole * 0.8, "the split weights are most of the model: a rank must hold far less"
