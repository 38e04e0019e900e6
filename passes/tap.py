"""tap: expose chosen hidden states as extra graph outputs.

A tapped graph returns `(original_output, {point: tensor, ...})`: the output it returned before,
unchanged, and a dict from each tapped module path to the value that leaves that module (the
block's output for a residual block). `points=[path,...]` names modules by their dotted path;
by default every residual block the structure analysis finds is tapped, so the pass works on
whatever blocks prune-layers left (they keep their original names) and whatever head counts
prune-heads left. Distillation (bmc/distill.py) reads a student's and a teacher's hidden states
this way. The tapped paths, in output order, are in the tap plan (`ir.TapPlan`).

No node is added or changed: the output node gets the tapped nodes appended to its flat list
and export's pytree output spec is widened to match, so the graph still verifies, runs with
the same inputs and re-traces with torch.export.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch.fx as fx
import torch.utils._pytree as pytree

from bmc import ir
from bmc.errors import PipelineError
from bmc.passmgr.manager import Pass, PassResult, register_pass
from bmc.analysis.structure import structure_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TapOptions:
    points: Optional[tuple[str, ...]] = None  # module paths; none: every residual block

    def __post_init__(self):
        if self.points is not None:
            if not self.points or any(not p for p in self.points):
                raise ValueError("points takes module paths like [transformer.h.0]; leave it out to tap every block")
            if len(set(self.points)) != len(self.points):
                raise ValueError(f"points names a module twice: {list(self.points)}")


def _within(path: str, module: str) -> bool:
    return path == module or path.startswith(module + ".")


def _same_type(a: fx.Node, b: fx.Node) -> bool:
    va, vb = ir.tensor_val(a), ir.tensor_val(b)
    return va is not None and vb is not None and va.shape == vb.shape and va.dtype == vb.dtype


def leaving_value(gm: fx.GraphModule, path: str) -> fx.Node:
    """The one node inside module `path` whose value is used outside it (or returned)."""
    inside = [n for n in gm.graph.nodes if n.op == "call_function" and _within(ir.module_path(n), path)]
    if not inside:
        raise PipelineError(f"tap: no node of the graph lies in module {path!r}; name a module path the graph "
                            f"runs (e.g. a block from bmc-opt --analyze)")
    members = set(inside)
    leaving = [n for n in inside if any(u not in members for u in n.users)]
    if len(leaving) > 1:
        # a block may also hand out side values (a cache, attention weights): the residual
        # stream is the one shaped like a value entering the block
        entering = {a for n in inside for a in n.all_input_nodes if a not in members and a.op != "get_attr"}
        leaving = [n for n in leaving if any(_same_type(n, e) for e in entering)]
    if len(leaving) != 1 or ir.tensor_val(leaving[0]) is None:
        raise PipelineError(f"tap: module {path!r} hands {len(leaving)} tensors to the rest of the graph, not one; "
                            f"tap a module with a single output")
    return leaving[0]


def _widened_spec(out_spec: pytree.TreeSpec, points: tuple[str, ...]) -> pytree.TreeSpec:
    """The spec of (original output, {point: tensor}); rebuilt through a dummy tree, which
    works for any registered output type without constructing TreeSpecs by hand."""
    original = pytree.tree_unflatten([0] * out_spec.num_leaves, out_spec)
    return pytree.tree_structure((original, {p: 0 for p in points}))


def _append_outputs(gm: fx.GraphModule, nodes: list[fx.Node], points: tuple[str, ...]) -> None:
    output = gm.graph.output_node()
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is not None and info.out_spec is not None:
        flat = list(output.args[0]) if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
        output.args = (tuple(flat + nodes),)
        codegen.pytree_info = info._replace(out_spec=_widened_spec(info.out_spec, points))
    else:  # a plain fx graph returns its output argument as written
        output.args = ((output.args[0], dict(zip(points, nodes))),)
    if "val" in output.meta:  # as shape-prop writes it: the output argument with values for nodes
        output.meta["val"] = pytree.tree_map(lambda a: a.meta.get("val") if isinstance(a, fx.Node) else a,
                                             output.args[0])


@register_pass("tap", options=TapOptions, provides=("tapped",), forbids=("staged", "fused-regions", "tapped"))
class Tap(Pass):
    """Expose hidden states (every block's output, or named modules') as extra graph outputs."""

    def run(self, gm: fx.GraphModule) -> PassResult:
        points = self.options.points or tuple(b.name for b in structure_of(gm).blocks)
        if not points:
            raise PipelineError("tap: the structure analysis found no residual blocks in this model; "
                                "name the modules to tap with points=[...]")
        nodes = [leaving_value(gm, p) for p in points]
        _append_outputs(gm, nodes, points)
        ir.set_plan(gm, ir.TapPlan(tuple(points)))
        gm.graph.lint()
        gm.recompile()
        log.info("tap: %d hidden states exposed: %s", len(points), list(points))
        return PassResult(gm, True, {"points": len(points)})
