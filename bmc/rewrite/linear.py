"""Projections in the graph: the nodes computing x @ W.T (+ b) for a weight, and their operands.

Three forms reach the graph: aten.linear(x, W[, b]) with W stored (out, in); aten.addmm(b, x, W)
with W stored (in, out), as Hugging Face's Conv1D does; and mm/matmul(x, W') where W' is the
weight itself (stored (in, out)) or its transpose (W.t(), W.T, W.transpose(0, 1): stored
(out, in)). Every pass that rewrites projections (tp, prune-heads, prune-ffn, quant-int8) sees
all three through `projection`, `projections` (by weight) and `operands`.
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


def read_elsewhere(weight: fx.Node, projs: list[Projection], besides: frozenset = frozenset()) -> bool:
    """Whether anything but these projections (and the nodes `besides`) reads the weight,
    directly or through their transposes: an embedding lookup tied to it, a norm, another product..."""
    ours = {p.node for p in projs} | {p.transpose for p in projs if p.transpose is not None}
    transposes = [t for t in ours if t.op == "call_function" and t.args and t.args[0] is weight]
    ours |= besides
    return any(u not in ours for u in weight.users) or any(u not in ours for t in transposes for u in t.users)


def projections(gm: fx.GraphModule, weight: str, allow_embedding: bool = False) -> list[fx.Node] | None:
    """The nodes computing a projection with this weight, in any form (linear, Conv1D addmm,
    a matmul by W or by its transpose); None if anything else uses the weight (a tied
    embedding lookup aside, when `allow_embedding`)."""
    node = ir.parameter_nodes(gm).get(weight)
    if node is None:
        return None
    found = [p for p in map(projection, _products_reading(node)) if p is not None and p.weight is node]
    lookups = frozenset(u for u in node.users if allow_embedding and u.args[0] is node
                        and u.target in (aten.embedding.default, torch.ops.bmc.vocab_parallel_embedding.default))
    if not found or read_elsewhere(node, found, lookups):
        return None
    return [p.node for p in found]


def _products_reading(weight: fx.Node) -> list[fx.Node]:
    """The weight's users and its transposes' users: where a product by it can be."""
    users = list(weight.users)
    return users + [u for t in users if _transposed_weight(t) is weight for u in t.users]


def operands(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None]:
    """(input, weight's get_attr, bias added inside the product) of a projection node."""
    found = projection(node)
    if found is None:
        raise ValueError(f"{node.name} is not a projection by a weight")
    return found.x, found.weight, found.bias


def bias_after(node: fx.Node) -> fx.Node | None:
    """The 1-D parameter added to a matmul-form product right after it (its only user), as
    x @ W.t() + b is traced; None for the other forms (their bias is an operand)."""
    if node.target not in _MATMULS or len(node.users) != 1:
        return None
    (user,) = node.users
    if user.target not in (aten.add.Tensor, aten.add_.Tensor) or len(user.args) != 2:
        return None
    other = user.args[1] if user.args[0] is node else user.args[0]
    if isinstance(other, fx.Node) and other.op == "get_attr" and _rank(other) == 1 and _is_parameter(other):
        return other
    return None
