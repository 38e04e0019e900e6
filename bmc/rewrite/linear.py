"""Projections in the graph: the nodes computing x @ W.T (+ b) for a weight, and their operands.

Three forms reach the graph: aten.linear(x, W[, b]) with W stored (out, in); aten.addmm(b, x, W)
with W stored (in, out), as Hugging Face's Conv1D does; and mm/matmul(x, W') where W' is the
weight itself (stored (in, out)) or its transpose (W.t(), W.T, W.transpose(0, 1): stored
(out, in)). `projections`/`operands` see the first two (what tp and prune-heads follow);
`projection`/`all_projections` see every form (what quant-int8 rewrites).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx

from bmc import ir

aten = torch.ops.aten

_MATMULS = (aten.mm.default, aten.matmul.default)
Form = Literal["linear", "addmm", "matmul"]


@dataclass(frozen=True)
class Projection:
    """One x @ W^T product by a weight parameter, in whichever form the graph computes it."""

    node: fx.Node  # the product: linear, addmm, mm or matmul
    x: fx.Node
    weight: fx.Node  # the parameter's get_attr
    bias: fx.Node | None  # added inside the product (linear, addmm); an add after mm/matmul is not part of it
    form: Form
    in_out: bool  # the weight is stored (in, out): transpose it for the (out, in) rows of a linear
    transpose: fx.Node | None  # the node transposing the weight on the way, if any


def _transposed_weight(node: fx.Node) -> fx.Node | None:
    """The get_attr a 2-D transpose (t, numpy_T, transpose(0, 1), permute([1, 0])) reads."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or not node.args:
        return None
    source = node.args[0]
    if not isinstance(source, fx.Node) or source.op != "get_attr" or _rank(source) != 2 or not _is_parameter(source):
        return None
    if node.target in (aten.t.default, aten.numpy_T.default):
        return source
    if node.target is aten.transpose.int and {d % 2 for d in node.args[1:3]} == {0, 1}:
        return source
    if node.target is aten.permute.default and [d % 2 for d in node.args[1]] == [1, 0]:
        return source
    return None


def _is_parameter(node: fx.Node) -> bool:
    try:
        node.graph.owning_module.get_parameter(str(node.target))
    except AttributeError:
        return False  # a buffer (a fixed table) or a missing attribute: nothing to quantize or prune
    return True


def _rank(node: fx.Node) -> int | None:
    val = ir.tensor_val(node)
    return val.dim() if val is not None else None


def _weight_operand(arg) -> tuple[fx.Node, bool, fx.Node | None] | None:
    """(get_attr, stored (in, out), transpose node) for the right-hand operand of a product
    that multiplies by its (in, out) matrix; None when it is not a 2-D parameter."""
    if isinstance(arg, fx.Node) and arg.op == "get_attr" and _rank(arg) == 2 and _is_parameter(arg):
        return arg, True, None
    source = _transposed_weight(arg)
    return (source, False, arg) if source is not None else None


def projection(node: fx.Node) -> Projection | None:
    """The projection `node` computes, or None if it is not one (an addmm with beta/alpha other
    than 1, a matmul by an activation, ...)."""
    if node.op != "call_function":
        return None
    if node.target is aten.linear.default:
        weight = node.args[1]
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr" and _is_parameter(weight)):
            return None
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return Projection(node, node.args[0], weight, bias, "linear", False, None)
    if node.target is aten.addmm.default:
        scalars = (*node.args[3:], *node.kwargs.values())
        found = _weight_operand(node.args[2])
        if found is None or any(s != 1 for s in scalars):
            return None
        return Projection(node, node.args[1], found[0], node.args[0], "addmm", found[1], found[2])
    if node.target in _MATMULS:
        found = _weight_operand(node.args[1])
        if found is None or _rank(node.args[0]) is None or _rank(node.args[0]) < 1:
            return None
        return Projection(node, node.args[0], found[0], None, "matmul", found[1], found[2])
    return None


def all_projections(gm: fx.GraphModule) -> list[Projection]:
    """Every projection by a weight parameter, in graph order."""
    return [p for n in gm.graph.nodes if (p := projection(n)) is not None]


def read_elsewhere(weight: fx.Node, projs: list[Projection]) -> bool:
    """Whether anything but these projections reads the weight (directly or through their
    transposes): an embedding lookup tied to it, a norm, another product..."""
    ours = {p.node for p in projs} | {p.transpose for p in projs if p.transpose is not None}
    transposes = [t for t in ours if t.op == "call_function" and t.args and t.args[0] is weight]
    return any(u not in ours for u in weight.users) or any(u not in ours for t in transposes for u in t.users)


def projections(gm: fx.GraphModule, weight: str, allow_embedding: bool = False) -> list[fx.Node] | None:
    """The nodes computing the projection with this weight: linear(x, W[, b]), or
    addmm(b, x, W) with W stored (in, out); None if anything else uses the weight (a tied
    embedding lookup aside, when `allow_embedding`)."""
    node = ir.parameter_nodes(gm).get(weight)
    if node is None:
        return None
    users = [u for u in node.users
             if (u.target is aten.linear.default and u.args[1] is node)
             or (u.target is aten.addmm.default and u.args[2] is node)]
    lookups = [u for u in node.users if allow_embedding and u.args[0] is node
               and u.target in (aten.embedding.default, torch.ops.bmc.vocab_parallel_embedding.default)]
    return users if users and len(users) + len(lookups) == len(node.users) else None


def operands(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None]:
    """(input, weight, bias) of a projection node."""
    if node.target is aten.addmm.default:
        return node.args[1], node.args[2], node.args[0]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return node.args[0], node.args[1], bias
