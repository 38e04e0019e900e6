"""A program saved in one process runs the same in another: compile, save, load in a fresh
process, run; the plans are equal and the outputs (or training losses) agree to 1e-6.

Every registered pass and preset is covered: at world size 1 here, and the ones that need
several ranks (tp, pp and their compositions) on gloo ranks below."""
import json

import pytest
import torch

import bmc
from bmc import ir, passmgr
from bmc.cli.local_ranks import run_ranks
from bmc.models import zoo

TOLERANCE = 1e-6
# Every pass and preset with its default options, at world size 1, and compositions.
WORLD_ONE = ["amp", "amp{dtype=fp16}", "annotate-cost", "dce", "dp", "insert-collectives", "insert-offload",
             "insert-offload{what=optimizer}", "insert-remat", "insert-remat{policy=selective}", "prune-ffn",
             "prune-heads", "prune-layers", "quant-int8", "quant-int8{act=dynamic}", "shape-prop", "tap", "verify",
             "zero", "ckpt", "zero1", "zero2", "zero3", "cleanup", "analyze",
             "prune-heads{ratio=0.5},prune-layers{drop=[1]},quant-int8", "amp,zero3,ckpt",
             "prune-ffn,tap,insert-offload"]
# (pipeline, world size, rows the program is traced with: a replica's slice of the global
# batch of 8, or one microbatch of it): what needs several ranks.
DISTRIBUTED = [("tp2", 2, 8), ("zero3", 2, 4), ("pp2", 2, 4), ("amp,zero1", 2, 4), ("tp2,zero3,ckpt", 2, 8)]
THREE_D = ("amp,tp2,zero{stage=1},pp{stages=2}", 8, 2)
NEEDS_RANKS = {"tp", "pp", "tp2", "tp4", "tp8", "pp2", "pp4", "pp8"}


def _names(pipeline: str) -> set[str]:
    """The passes and presets a pipeline names, and the passes it expands to."""
    named = {name for name, _, _ in passmgr.manager._Parser(pipeline).items()}
    return named | {spec.name for spec in passmgr.parse_pipeline(pipeline).passes}


def test_every_pass_and_preset_is_covered():
    passmgr.load_builtin_passes()
    covered = set().union(*(_names(p) for p in WORLD_ONE), *(_names(p) for p, _, _ in [*DISTRIBUTED, THREE_D]))
    missing = (set(passmgr.REGISTRY) | set(passmgr.PRESETS)) - covered - NEEDS_RANKS
    assert not missing, f"add these to the round-trip test: {sorted(missing)}"


def _model():
    torch.manual_seed(0)
    return zoo.build("gpt-tiny")


def _plans(gm) -> str:
    return json.dumps(ir.plans_to_json(gm), sort_keys=True)


def _flat(out) -> list[torch.Tensor]:
    return [t.detach().float() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _load_and_run(rank, world, paths, inputs):
    results = {}
    for path in paths:
        prog = bmc.load(path)
        results[path] = (_plans(prog.graph_module), _flat(prog(*inputs)))
    return results


@pytest.mark.slow  # 18 s; the distributed round trips below load saved programs in fresh processes too
def test_every_world_one_pipeline_round_trips_through_a_fresh_process(tmp_path):
    model = _model()
    inputs = model.example_inputs()
    expected = {}
    for index, pipeline in enumerate(WORLD_ONE):
        prog = bmc.compile(model, passes=pipeline, example_inputs=inputs)
        path = str(tmp_path / f"p{index}.pt2")
        prog.save(path)
        expected[path] = (pipeline, _plans(prog.graph_module), _flat(prog(*inputs)))
    loaded = run_ranks(1, _load_and_run, list(expected), inputs)[0]
    for path, (pipeline, plans, outputs) in expected.items():
        got_plans, got = loaded[path]
        assert got_plans == plans, pipeline
        assert len(got) == len(outputs), pipeline
        for a, b in zip(got, outputs):
            torch.testing.assert_close(a, b, atol=TOLERANCE, rtol=TOLERANCE, msg=pipeline)


def test_a_saved_remat_program_gets_its_regions_back(tmp_path):
    model = _model()
    prog = bmc.compile(model, passes="ckpt", example_inputs=model.example_inputs())
    prog.save(str(tmp_path / "ckpt.pt2"))
    loaded = bmc.load(str(tmp_path / "ckpt.pt2")).graph_module
    calls = loaded.graph.find_nodes(op="call_function", target=torch.utils.checkpoint.checkpoint)
    assert [ir.get(n, ir.Remat).region for n in calls] == ["transformer.h.0", "transformer.h.1"]


# ------------------------------------------------------------------ on several ranks

STEPS = 3


def _batch(rows: int, step: int):
    g = torch.Generator().manual_seed(200 + step)
    x = torch.randint(0, 256, (rows, 16), generator=g)
    return x, torch.roll(x, -1, 1)


def _train(prog, rank: int, world: int) -> list[float]:
    """STEPS AdamW steps; each data-parallel replica takes its slice of a fixed global batch
    (ranks lie on a (pp, dp, tp) mesh)."""
    opt = prog.optimizer(torch.optim.AdamW, lr=1e-2)
    tp, pp = ir.get_plan(prog.graph_module, ir.TensorParallelPlan), ir.get_plan(prog.graph_module, ir.PipelinePlan)
    tp_size, pp_size = tp.degree if tp else 1, pp.stages if pp else 1
    replicas = world // (tp_size * pp_size)
    rows, replica = 8 // replicas, (rank // tp_size) % replicas
    losses = []
    for step in range(STEPS):
        x, y = (t[replica * rows:(replica + 1) * rows] for t in _batch(8, step))
        if pp is not None:
            loss = prog.step(x, y)  # the mean over every rank's microbatches
        else:
            loss = prog(x, y)
            loss.backward()
            loss = loss.detach().clone()
            torch.distributed.all_reduce(loss)
            loss /= world
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return losses


def _compile_save_train(rank, world, pipeline, rows, path):
    prog = bmc.compile(_model(), passes=pipeline, example_inputs=_batch(rows, 0))
    prog.save(path)
    return _plans(prog.graph_module), _train(prog, rank, world)


def _load_train(rank, world, path):
    prog = bmc.load(path)
    return _plans(prog.graph_module), _train(prog, rank, world)


def _round_trip(pipeline: str, world: int, rows: int, path: str) -> None:
    before = run_ranks(world, _compile_save_train, pipeline, rows, path)
    after = run_ranks(world, _load_train, path)
    for (plans, losses), (got_plans, got_losses) in zip(before, after):
        assert got_plans == plans
        assert max(abs(a - b) for a, b in zip(losses, got_losses)) <= TOLERANCE, (losses, got_losses)


@pytest.mark.parametrize("pipeline,world,rows", DISTRIBUTED, ids=[p for p, _, _ in DISTRIBUTED])
def test_distributed_program_saved_then_loaded_trains_the_same(pipeline, world, rows, tmp_path):
    _round_trip(pipeline, world, rows, str(tmp_path / "prog.pt2"))


@pytest.mark.slow
def test_3d_program_saved_then_loaded_trains_the_same(tmp_path):
    _round_trip(*THREE_D, str(tmp_path / "prog.pt2"))
