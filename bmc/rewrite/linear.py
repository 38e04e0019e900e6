"""Projections in the graph: the nodes computing x @ W.T (+ b) for a weight, and their operands
(aten.linear, or aten.addmm with W stored (in, out) as Hugging Face's Conv1D does)."""
from __future__ import annotations

import torch
import torch.fx as fx

from bmc import ir

aten = torch.ops.aten


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
