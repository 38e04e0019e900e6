"""insert-collectives: f and g where tp's placements need them, once each, and nothing runs
without them. Numerical equivalence of tp + insert-collectives against the single-device
model is tests/passes/test_tp.py (every case runs both passes)."""
import pytest
import torch

import bmc
import bmc.ir.ops  # noqa: F401 - registers the bmc:: ops named below
from bmc.models import zoo
from bmc.errors import BackendError, PipelineError
from bmc.passmgr.manager import PassManager

F_OP, G_OP = torch.ops.bmc.copy_to_group.default, torch.ops.bmc.reduce_from_group.default


def _plan(name: str, pipeline: str):
    model = zoo.build(name)
    return PassManager(pipeline).run(bmc.trace(model, model.example_inputs())).graph_module


def _count(gm, op):
    return len(gm.graph.find_nodes(op="call_function", target=op))


@pytest.mark.parametrize("name, blocks", [("gpt-tiny", 2), ("llama-tiny", 2)])
def test_one_f_per_replicated_input_and_one_g_per_partial_product(name, blocks):
    gm = _plan(name, "tp{degree=2}")
    assert _count(gm, F_OP) == _count(gm, G_OP) == 0  # tp records placements only
    partial = [n for n in gm.graph.nodes if "tp:partial" in bmc.ir.format_node(n)]
    assert len(partial) == 2 * blocks  # attention out and MLP down, per block
    PassManager("insert-collectives").run(gm)
    # q, k and v (or the fused qkv) read one normed input: one f for them; one for the MLP
    assert _count(gm, F_OP) == 2 * blocks and _count(gm, G_OP) == 2 * blocks
    for node in partial:
        assert [u.target for u in node.users] == [G_OP]  # nothing reads a summand but g


def test_running_it_twice_or_without_tp_changes_nothing():
    gm = _plan("gpt-tiny", "tp2")
    assert not PassManager("insert-collectives").run(gm).modified and _count(gm, G_OP) == 4
    assert not PassManager("insert-collectives").run(_plan("gpt-tiny", "dce")).modified


def test_a_split_graph_without_collectives_does_not_run():
    model = zoo.build("gpt-tiny")
    with pytest.raises(BackendError, match="no collectives: add insert-collectives after tp"):
        bmc.compile(model, passes="tp{degree=2}", example_inputs=model.example_inputs(), world_size=2)


def test_after_pp_or_regions_is_refused():
    with pytest.raises(PipelineError, match="insert-collectives after pp"):
        _plan("gpt-tiny", "tp{degree=2},pp{stages=2},insert-collectives")
    with pytest.raises(PipelineError, match="insert-collectives must run before passes that fuse regions"):
        _plan("gpt-tiny", "tp{degree=2},insert-remat,insert-collectives")
