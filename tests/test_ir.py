"""bmc/ir.py: the annotation schema, replace_node, the printer (golden) and the dot output."""
import os
import shutil
import subprocess

import pytest
import sympy
import torch

import bmc
from bmc import ir
from bmc.errors import VerificationError
from helpers import assert_same_outputs_and_grads, traced_copy

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def _graph():
    torch.manual_seed(0)
    return bmc.trace(TwoLayer(), (torch.randn(2, 4, 8),), dynamic=True)


def _node(gm, target):
    return next(n for n in gm.graph.nodes if ir.target_str(n) == target)


def test_annotations_are_typed_and_namespaced():
    gm = _graph()
    node = _node(gm, "aten.gelu")
    shard = ir.Shard((ir.Placement("tp", "shard", 2), ir.Placement("dp", "replicate")))
    ir.annotate(node, shard)
    ir.annotate(node, ir.Stage(1))
    assert ir.get(node, ir.Shard) == shard and ir.get(node, ir.Stage).index == 1
    assert ir.get(node, ir.Remat) is None
    assert [k for k, _ in ir.annotations(node)] == ["bmc.shard", "bmc.stage"]
    with pytest.raises(TypeError):
        ir.annotate(node, {"not": "a dataclass"})
    with pytest.raises(ValueError):
        ir.Placement("tp", "shard")  # a shard needs its dim
    with pytest.raises(Exception):
        shard.placements = ()  # frozen


def test_unknown_or_mistyped_annotation_fails_verification():
    gm = _graph()
    node = _node(gm, "aten.gelu")
    node.meta["bmc.sharding"] = ir.Stage(0)
    with pytest.raises(VerificationError, match="unknown annotation 'bmc.sharding'"):
        ir.check_annotations(node)
    del node.meta["bmc.sharding"]
    node.meta["bmc.stage"] = 3
    with pytest.raises(VerificationError, match="expected Stage"):
        ir.check_annotations(node)


def test_annotations_survive_json():
    gm = _graph()
    node = _node(gm, "aten.gelu")
    for value in (ir.Shard((ir.Placement("tp", "shard", 1),)), ir.Stage(2), ir.Remat("block", "h.0"),
                  ir.Quant(), ir.Origin("tp", "linear"), ir.Cost(sympy.Symbol("B") * 4, sympy.Integer(3),
                                                                 sympy.Integer(0))):
        ir.annotate(node, value)
    text = ir.annotations_to_json(node)
    other = _node(gm, "aten.linear")
    ir.annotations_from_json(other, text)
    assert dict(ir.annotations(other)) == dict(ir.annotations(node))


def test_replace_node_carries_meta_and_provenance():
    model = TwoLayer()
    inputs = (torch.randn(2, 4, 8),)
    gm = traced_copy(model, inputs)
    old = _node(gm, "aten.gelu")
    with gm.graph.inserting_after(old):
        new = gm.graph.call_function(torch.ops.aten.gelu.default, old.args, old.kwargs)
    ir.replace_node(old, new, "test-pass")
    gm.recompile()
    assert new.meta["val"].shape == (2, 4, 16)
    assert new.meta["nn_module_stack"] and new.meta["stack_trace"]
    assert ir.get(new, ir.Origin) == ir.Origin("test-pass", "gelu")
    assert_same_outputs_and_grads(model, gm, inputs)


def test_printer_matches_golden():
    gm = _graph()
    ir.annotate(_node(gm, "aten.gelu"), ir.Shard((ir.Placement("tp", "shard", 2),)))
    text = ir.format_graph(gm)
    path = os.path.join(GOLDEN, "two_layer.txt")
    if os.environ.get("BMC_UPDATE_GOLDEN"):
        with open(path, "w") as f:
            f.write(text)
        pytest.skip("golden file rewritten: nothing was compared")
    with open(path) as f:
        assert text == f.read(), "printed graph changed; rerun with BMC_UPDATE_GOLDEN=1 if intended"


def test_printer_shows_shapes_dtypes_modules_and_annotations():
    gm = _graph()
    ir.annotate(_node(gm, "aten.linear"), ir.Stage(0))
    text = ir.format_graph(gm)
    assert "%x : f32[B, S, 8] = input" in text
    assert "param up.weight" in text and "f32[16, 8]" in text
    assert "aten.gelu(%linear)" in text and "@up" in text
    assert "{bmc.stage=0}" in text


def test_dot_is_valid_graphviz():
    dot_src = ir.to_dot(_graph(), "two-layer")
    assert dot_src.startswith('digraph "two-layer" {') and "->" in dot_src
    if shutil.which("dot"):
        subprocess.run(["dot", "-Tsvg"], input=dot_src.encode(), check=True, capture_output=True)
