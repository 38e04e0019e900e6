"""insert-collectives: the collectives the tp shardings need, as bmc ops with Megatron's semantics.

The tp pass splits weights and records on every activation how it lies across the tp ranks
(`bmc.shard`: `tp:shard(d)`, or `tp:partial` for a row-parallel product each rank holds a
summand of). This pass reads those placements and puts
- f (`bmc::copy_to_group`: identity forward, all-reduce backward) on each replicated value
  that feeds a column-parallel projection (once per value, however many projections read it),
- g (`bmc::reduce_from_group`: all-reduce forward, identity backward) after each partial value,
  before anything reads it (the row-parallel bias, which tp adds after the product, is then
  added once, to the sum).
Both name their group ("tp"), so the dumped graph shows every collective with its group.

Sequence parallelism (Korthikanti et al. 2022: all-gather / reduce-scatter on the sequence
dimension around the norms) is not built yet.
"""
from __future__ import annotations

import torch
import torch.fx as fx

import bmc.ops  # noqa: F401 - registers the bmc:: collectives
from bmc import ir
from bmc.pass_order import require_before_pp, require_before_regions
from bmc.passmgr import Pass, PassResult, register_pass

GROUP = "tp"
aten = torch.ops.aten
F_OP = torch.ops.bmc.copy_to_group.default
G_OP = torch.ops.bmc.reduce_from_group.default


def placement(node: fx.Node, axis: str = GROUP) -> ir.Placement | None:
    shard = ir.get(node, ir.Shard)
    return next((p for p in (shard.placements if shard else ()) if p.axis == axis), None)


def is_partial(node: fx.Node) -> bool:
    p = placement(node)
    return p is not None and p.kind == "partial"


def column_input(node: fx.Node) -> fx.Node | None:
    """The replicated activation a column-parallel projection reads (None if `node` is not one)."""
    if node.target not in (aten.linear.default, aten.addmm.default):
        return None
    x, weight = (node.args[1], node.args[2]) if node.target is aten.addmm.default else node.args[:2]
    out, w = placement(node), placement(weight)
    if out is None or out.kind != "shard" or w is None or w.kind != "shard" or placement(x) is not None:
        return None
    return x


def _reduce_after(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    with gm.graph.inserting_after(node):
        g = gm.graph.call_function(G_OP, (node, GROUP))
    ir.copy_meta(node, g, "insert-collectives")
    ir.clear(g, ir.Shard)  # the sum: every rank holds all of it
    node.replace_all_uses_with(g, delete_user_cb=lambda user: user is not g)
    return g


def _copy_after(gm: fx.GraphModule, x: fx.Node) -> fx.Node:
    with gm.graph.inserting_after(x):
        f = gm.graph.call_function(F_OP, (x, GROUP))
    ir.copy_meta(x, f, "insert-collectives")
    return f


@register_pass("insert-collectives", invalidates=("cost",))
class InsertCollectives(Pass):
    """Megatron's f and g where the tp shardings need them (after tp, before pp)."""

    def run(self, gm: fx.GraphModule) -> PassResult:
        require_before_pp(gm, "insert-collectives")
        require_before_regions(gm, "insert-collectives")
        plan = gm.meta.get("bmc.tp")
        if not plan or plan.get("collectives") is not None:
            return PassResult(gm, False, {"f": 0, "g": 0})
        copies: dict[fx.Node, fx.Node] = {}
        reduced = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target in (F_OP, G_OP):
                continue
            if is_partial(node):
                _reduce_after(gm, node)
                reduced += 1
                continue
            x = column_input(node)
            if x is not None:
                if x not in copies:
                    copies[x] = _copy_after(gm, x)
                node.replace_input_with(x, copies[x])
        plan["collectives"] = len(copies) + reduced
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True, {"f": len(copies), "g": reduced})
