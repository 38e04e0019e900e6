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

With `sequence_parallel=true` (Korthikanti et al. 2022) the activations between the split
regions (residual adds, norms, dropouts) are split along the sequence (dim 1) instead of
replicated: f becomes an all-gather on the sequence (reduce-scatter in backward), g a
reduce-scatter on the sequence (all-gather in backward), the values that enter the first
region (the embeddings) are scattered, and the first op that is not sequence-local (the
output head, the loss's reshape) gets the sequence gathered back. Each rank then keeps 1/tp
of those activations, for the same communication volume.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from bmc import ir
from bmc.ir import ops
from bmc.errors import PipelineError
from bmc.ir.shapes import propagate_shapes
from bmc.rewrite.linear import projection
from bmc.passmgr.manager import Pass, PassResult, register_pass

GROUP = "tp"
aten = torch.ops.aten
F_OP = torch.ops.bmc.copy_to_group.default
G_OP = torch.ops.bmc.reduce_from_group.default
AG_OP = torch.ops.bmc.all_gather.default
RS_OP = torch.ops.bmc.reduce_scatter.default
SC_OP = torch.ops.bmc.scatter.default
UN_OP = torch.ops.bmc.unscatter.default


def placement(node: fx.Node, axis: str = GROUP) -> ir.Placement | None:
    shard = ir.get(node, ir.Shard)
    return next((p for p in (shard.placements if shard else ()) if p.axis == axis), None)


def is_partial(node: fx.Node) -> bool:
    p = placement(node)
    return p is not None and p.kind == "partial"


def column_input(node: fx.Node) -> fx.Node | None:
    """The replicated activation a column-parallel projection reads (None if `node` is not one)."""
    found = projection(node)  # any form: linear, Conv1D addmm, a matmul by W or W.t()
    if found is None:
        return None
    x, weight = found.x, found.weight
    out, w = placement(node), placement(weight)
    if out is None or out.kind != "shard" or w is None or w.kind != "shard" or placement(x) is not None:
        return None
    return x


def _collective_after(gm: fx.GraphModule, value: fx.Node, op, sequence_parallel: bool) -> fx.Node:
    """`op` applied to `value`, right after it (on the sequence dim under sequence parallelism)."""
    with gm.graph.inserting_after(value):
        out = gm.graph.call_function(op, (value, SEQ, GROUP) if sequence_parallel else (value, GROUP))
    ir.copy_meta(value, out, "insert-collectives")
    return out


def _reduce_after(gm: fx.GraphModule, node: fx.Node, op, sequence_parallel: bool) -> fx.Node:
    """g after a partial value; everything that read the partial value reads the sum."""
    g = _collective_after(gm, node, op, sequence_parallel)
    node.replace_all_uses_with(g, delete_user_cb=lambda user: user is not g)
    return g


@dataclass(frozen=True)
class CollectivesOptions:
    sequence_parallel: bool = False


@register_pass("insert-collectives", options=CollectivesOptions, provides=("tp-collectives",), invalidates=("cost",),
               forbids=("staged", "fused-regions"))
class InsertCollectives(Pass):
    """Megatron's f and g where the tp shardings need them (after tp, before pp)."""

    def run(self, gm: fx.GraphModule) -> PassResult:
        plan = ir.get_plan(gm, ir.TensorParallelPlan)
        if plan is None or plan.collectives is not None:
            return PassResult(gm, False, {"f": 0, "g": 0})
        sp = self.options.sequence_parallel
        if sp and ops.group_size(GROUP) != plan.degree:
            ops.register_group(GROUP, plan.degree)  # the fake kernels' shapes, while planning
        if sp:
            _check_sequence_layout(gm)
        f_op, g_op = (AG_OP, RS_OP) if sp else (F_OP, G_OP)
        copies: dict[fx.Node, fx.Node] = {}
        reduced: list[fx.Node] = []
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target in (f_op, g_op):
                continue
            if is_partial(node):
                reduced.append(_reduce_after(gm, node, g_op, sp))
                continue
            x = column_input(node)
            if x is not None:
                if x not in copies:
                    copies[x] = _collective_after(gm, x, f_op, sp)
                node.replace_input_with(x, copies[x])
        stats = {"f": len(copies), "g": len(reduced)}
        if sp:
            stats.update(SequenceSplit(gm, plan.degree).run(list(copies.values()), reduced))
            propagate_shapes(gm)
        ir.replace_plan(gm, ir.TensorParallelPlan, collectives=len(copies) + len(reduced), sequence_parallel=sp)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True, stats)


# ------------------------------------------------------------------ sequence parallelism


def _check_sequence_layout(gm: fx.GraphModule) -> None:
    """Sequence parallelism follows [batch, seq, ...] activations; a model that flattens them
    before its projections (Hugging Face's Conv1D views x as [batch * seq, hidden]) is refused."""
    for node in gm.graph.nodes:
        edge = column_input(node) if node.op == "call_function" else None
        if node.op == "call_function" and is_partial(node):
            edge = node
        val = ir.tensor_val(edge) if edge is not None else None
        if val is not None and val.dim() < 3:
            raise PipelineError(f"insert-collectives{{sequence_parallel=true}}: {edge.name} at "
                                f"{ir.module_path(edge) or 'the top level'} is {val.dim()}-d {tuple(val.shape)}, "
                                f"flattened from [batch, seq, hidden], so the sequence cannot be split there; "
                                f"use sequence_parallel=false for this model")

SEQ = 1  # the sequence dim of [batch, seq, hidden] activations
NOT_POINTWISE_BUT_LOCAL = {aten.dropout.default, aten.to.dtype, aten._to_copy.default, aten.alias.default}


def _seq_dim(val, out_ndim: int) -> int:
    """The dim of a tensor that lines up with the output's sequence dim under broadcasting."""
    return val.dim() - (out_ndim - SEQ)


def _is_local(node: fx.Node) -> bool:
    """Works on each sequence position alone: pointwise ops, casts, dropout, norms and means
    over the feature dims."""
    out = ir.tensor_val(node)
    if out is None or out.dim() < 3 or node.op != "call_function":
        return False
    target = node.target
    if target is aten.layer_norm.default:
        return len(node.args[1]) < out.dim() - SEQ
    if target is aten.mean.dim:
        dims = [d % out.dim() for d in (node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]])]
        return SEQ not in dims
    return target in NOT_POINTWISE_BUT_LOCAL or (isinstance(target, torch._ops.OpOverload)
                                                 and torch.Tag.pointwise in target.tags)


class SequenceSplit:
    """Splits the activations between tp regions along the sequence: scatters where they
    enter, follows the split through sequence-local ops, gathers where it must end."""

    def __init__(self, gm: fx.GraphModule, degree: int):
        self.gm, self.degree = gm, degree
        self.split: set[fx.Node] = set()
        self.replicated: dict[fx.Node, fx.Node] = {}
        self.stats = {"scattered": 0, "gathered": 0, "summed": 0}

    def run(self, gathers: list[fx.Node], reduce_scatters: list[fx.Node]) -> dict:
        self.split.update(reduce_scatters)
        for gather in gathers:
            self._split_upstream(gather.args[0], gather)
        order = list(self.gm.graph.nodes)
        self._follow_all(order)
        self._gather_outputs()
        for node in [n for n in self.split if n.target not in (AG_OP, RS_OP, SC_OP, UN_OP)]:
            self._sum_replicated_gradients(node)
        return self.stats

    def _sum_replicated_gradients(self, node: fx.Node) -> None:
        """A weight (or any whole value) read by a sequence-split op gets a gradient from this
        rank's positions only: f on it sums the gradient over the ranks (Megatron all-reduces
        the norms' gradients the same way)."""
        for arg in node.all_input_nodes:
            if arg in self.split or arg.target in (F_OP, AG_OP) or ir.tensor_val(arg) is None:
                continue
            if arg not in self.replicated:
                with self.gm.graph.inserting_after(arg):
                    self.replicated[arg] = self.gm.graph.call_function(F_OP, (arg, GROUP))
                ir.copy_meta(arg, self.replicated[arg], "insert-collectives")
                self.stats["summed"] += 1
            node.replace_input_with(arg, self.replicated[arg])

    def _gather_outputs(self) -> None:
        """The program's outputs are whole on every rank."""
        output = next(iter(self.gm.graph.find_nodes(op="output")))
        for arg in [a for a in output.all_input_nodes if a in self.split]:
            with self.gm.graph.inserting_before(output):
                gathered = self.gm.graph.call_function(UN_OP, (arg, SEQ, GROUP))
            ir.copy_meta(arg, gathered, "insert-collectives")
            output.replace_input_with(arg, gathered)
            self.stats["gathered"] += 1

    def _follow_all(self, order: list[fx.Node]) -> None:
        for node in order:
            if node.graph is None or node in self.split or node.op != "call_function" \
                    or node.target in (AG_OP, RS_OP, SC_OP, UN_OP):
                continue
            if any(a in self.split for a in node.all_input_nodes):
                self._follow(node)

    def _split_upstream(self, value: fx.Node, stop: fx.Node) -> None:
        """Make `value` sequence-split: through local ops back to where the activation is
        made, and scatter it there."""
        if value in self.split:
            return
        if _is_local(value):
            self.split.add(value)
            for arg in value.all_input_nodes:
                val = ir.tensor_val(arg)
                if val is not None and val.dim() > _seq_dim(val, ir.tensor_val(value).dim()) >= 0 \
                        and val.shape[_seq_dim(val, ir.tensor_val(value).dim())] != 1:
                    self._split_upstream(arg, value)
            return
        self._scatter_after(value, ir.tensor_val(stop).dim())

    def _scatter_after(self, value: fx.Node, out_ndim: int) -> None:
        dim = _seq_dim(ir.tensor_val(value), out_ndim)
        with self.gm.graph.inserting_after(value):
            scattered = self.gm.graph.call_function(SC_OP, (value, dim, GROUP))
        ir.copy_meta(value, scattered, "insert-collectives")
        # only the readers already split read the slice; any other reader keeps the whole value
        value.replace_all_uses_with(scattered, delete_user_cb=lambda u: u is not scattered and u in self.split)
        self.split.add(scattered)
        self.stats["scattered"] += 1

    def _follow(self, node: fx.Node) -> None:
        """`node` reads a split value: it is split too if it is local and its other inputs
        can be split alike; otherwise the split values it reads are gathered first."""
        if node.target is aten._assert_tensor_metadata.default:
            self.gm.graph.erase_node(node)  # export's check of the full-sequence shape
            return
        if _is_local(node):
            out_ndim = ir.tensor_val(node).dim()
            others = [a for a in node.all_input_nodes if a not in self.split and ir.tensor_val(a) is not None
                      and 0 <= _seq_dim(ir.tensor_val(a), out_ndim) < ir.tensor_val(a).dim()
                      and ir.tensor_val(a).shape[_seq_dim(ir.tensor_val(a), out_ndim)] != 1]
            self.split.add(node)
            for other in others:
                self._scatter_after(other, out_ndim)
            return
        for arg in [a for a in node.all_input_nodes if a in self.split]:
            with self.gm.graph.inserting_before(node):  # its reader is replicated: unscatter
                gathered = self.gm.graph.call_function(UN_OP, (arg, SEQ, GROUP))
            ir.copy_meta(arg, gathered, "insert-collectives")
            node.replace_input_with(arg, gathered)
            self.stats["gathered"] += 1
