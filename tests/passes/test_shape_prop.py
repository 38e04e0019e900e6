"""shape-prop: recomputes meta['val'] after a rewrite; the program itself is unchanged."""
import torch

from bmc import ir
from bmc.models import zoo
from bmc.passmgr.manager import PassManager
from helpers import assert_same_outputs_and_grads, traced_copy


def test_shape_prop_keeps_symbolic_shapes_and_equivalence():
    model = zoo.build("llama-tiny")
    inputs = model.example_inputs()
    gm = traced_copy(model, inputs, dynamic=True)
    before = {n.name: ir.type_str(n.meta.get("val")) for n in gm.graph.nodes if n.op != "output"}
    result = PassManager("shape-prop").run(gm)
    assert result.statistics["shape-prop.shapes-changed"] == 0
    assert before == {n.name: ir.type_str(n.meta.get("val")) for n in gm.graph.nodes if n.op != "output"}
    assert ir.type_str(gm.graph.output_node().meta["val"], {"s72": "B", "s70": "S"}).endswith(", 256])")
    assert_same_outputs_and_grads(model, gm, inputs)


def test_shape_prop_updates_shapes_after_a_rewrite():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    inputs = (torch.randn(3, 4),)
    gm = traced_copy(model, inputs)
    relu = next(n for n in gm.graph.nodes if ir.target_str(n) == "aten.relu")
    # A rewrite that changes a shape: duplicate the hidden features, then take the first half.
    with gm.graph.inserting_after(relu):
        wide = gm.graph.call_function(torch.ops.aten.cat.default, ([relu, relu], -1))
    with gm.graph.inserting_after(wide):
        narrow = gm.graph.call_function(torch.ops.aten.slice.Tensor, (wide, -1, 0, 8))
    relu.replace_all_uses_with(narrow, delete_user_cb=lambda user: user is not wide)
    for node in (wide, narrow):
        ir.copy_meta(relu, node, "test")  # stale shapes on purpose: [3, 8] for the cat
    gm.recompile()
    result = PassManager("shape-prop").run(gm)
    assert tuple(wide.meta["val"].shape) == (3, 16)
    assert result.statistics["shape-prop.shapes-changed"] == 1
    torch.testing.assert_close(gm(*inputs), model(*inputs))
