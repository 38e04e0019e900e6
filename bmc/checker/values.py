"""The values a check compares: every node's output (and the gradient flowing into it) while a
graph runs, recorded by name; and one rank's values of a distributed program put back together
from each node's `bmc.shard` placement."""
from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree

from bmc import ir

NAME_KEY = "bmc.check.name"  # node.meta["custom"]: the name a node had where the check compiled it


@dataclass
class Run:
    """What one input batch gave: the flat outputs, and each named node's value and gradient."""

    outputs: list[torch.Tensor]
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    param_grads: dict[str, torch.Tensor] = field(default_factory=dict)  # by parameter name, as held
    # (tp rank, its gradients) for each rank that holds weights a different way: every tp
    # rank, and under pp every stage's ranks (a tied weight's copies must agree)
    local_param_grads: list[tuple[int, dict[str, torch.Tensor]]] = field(default_factory=list)
    # ZeRO-2/3: this rank's flat slice of each averaged gradient, and the whole one's shape
    shard_grads: dict[str, tuple[torch.Tensor, tuple[int, ...]]] = field(default_factory=dict)


class _Recorder(fx.Interpreter):
    """Runs the graph node by node, keeping a detached copy of every tensor it computes and,
    when `grads`, a hook that keeps the gradient flowing into it in backward."""

    def __init__(self, gm: fx.GraphModule, run: Run, grads: bool):
        super().__init__(gm)
        self.record, self.want_grads = run, grads

    def run_node(self, node: fx.Node):
        value = super().run_node(node)
        if node.op == "call_function" and isinstance(value, torch.Tensor) and value.is_floating_point():
            name = node.meta.get("custom", {}).get(NAME_KEY, node.name)
            self.record.values[name] = value.detach().clone()
            if self.want_grads and value.requires_grad:
                value.register_hook(lambda g, name=name: self.record.grads.__setitem__(name, g.detach().clone()))
        return value


def call_recording(gm: fx.GraphModule, call, args: tuple, kwargs: dict, *, grads: bool,
                   stages: Sequence[fx.GraphModule] = ()) -> tuple[Run, Any]:
    """`call(*args, **kwargs)` (the program, which runs `gm` under whatever it sets up: ZeRO's
    gathers, the collectives' groups) with `gm`'s forward replaced by a recording run; under
    pp, each of this rank's `stages` (the graphs the schedule runs) is recorded instead."""
    run = Run(outputs=[])
    modules = list(stages) or [gm]
    for module in modules:
        module.forward = types.MethodType(_recording_forward(_Recorder(module, run, grads)), module)
    try:
        out = call(*args, **kwargs)
    finally:
        for module in modules:
            del module.forward
    run.outputs = [t.detach().clone() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    return run, out


def _recording_forward(recorder: _Recorder):
    codegen = recorder.module.graph._codegen

    def recording_forward(self, *a, **k):
        spec = getattr(getattr(codegen, "pytree_info", None), "in_spec", None)
        flat = fx_pytree.tree_flatten_spec((a, k), spec) if spec is not None else list(a)
        out = recorder.run(*flat, enable_io_processing=False)
        return codegen.process_outputs(out)

    return recording_forward


def probe_loss(out: Any, seed: int) -> torch.Tensor | None:
    """A scalar whose gradient reaches every parameter: the model's own loss where it returns
    one (its one scalar output, as pp's last stage takes it), else its floating outputs
    against fixed random directions (mean-free: a sum of squares is constant after a final
    LayerNorm, so its gradients would tell nothing)."""
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()
              and t.requires_grad]
    if not leaves:
        return None
    scalars = [t for t in leaves if t.dim() == 0]
    if len(scalars) == 1:
        return scalars[0].float()
    gen = torch.Generator().manual_seed(seed)
    total = 0
    for t in leaves:
        direction = torch.randn(t.shape, generator=gen)
        total = total + (t.float() * direction).sum() / t.numel()
    return total


# ------------------------------------------------------------------ one value from many ranks


def tp_placement(node: fx.Node) -> ir.Placement | None:
    """How the node's value lies over the tensor-parallel ranks ("sp" shards over them too)."""
    shard = ir.get(node, ir.Shard)
    for p in (shard.placements if shard else ()):
        if p.axis in ("tp", "sp"):
            return p
    return None


SPLITTING = {torch.ops.aten.split.Tensor, torch.ops.aten.split_with_sizes.default, torch.ops.aten.chunk.default,
             torch.ops.aten.slice.Tensor, torch.ops.aten.unbind.int, torch.ops.aten.select.int}


def segmented_values(gm: fx.GraphModule) -> dict[str, ir.Layout]:
    """The values whose shard holds a piece of each of several segments (a fused q|k|v product:
    rank r has q_r|k_r|v_r, so concatenating ranks is not the whole value): name -> the
    weight's layout, moved to the value's sharded dim. That is the product and what keeps its
    sharded dim whole after it (a bias added, the batch dims flattened or not); from where the
    parts are taken apart (a split, or a view into heads) each rank holds plain shards again,
    and it is there that a wrong layout shows: the heads a rank reads are not the original's."""
    plan = ir.get_plan(gm, ir.TensorParallelPlan)
    fused = {lay.param: lay for lay in (plan.layouts if plan else ()) if len(lay.segments) > 1}
    found: dict[str, ir.Layout] = {}
    for node in gm.graph.nodes:
        p = tp_placement(node)
        if node.op != "call_function" or node.target in SPLITTING or p is None or p.kind != "shard":
            continue
        weights = [fused[a.target] for a in node.all_input_nodes if a.op == "get_attr" and a.target in fused]
        inherited = [found[a.name] for a in node.all_input_nodes if a.name in found and _keeps_sharded_dim(a, node)]
        if weights or inherited:
            found[node.name] = _replace_dim((weights or inherited)[0], p.dim)
    return found


def _keeps_sharded_dim(source: fx.Node, node: fx.Node) -> bool:
    """`node`'s sharded dim is `source`'s, untouched: the same size, with the same elements
    after it (compared as text: the sizes may be symbolic)."""
    a, b = _shape(source), _shape(node)
    pa, pb = tp_placement(source), tp_placement(node)
    if a is None or b is None or pa is None or pb is None or pa.kind != "shard":
        return False
    da, db = pa.dim % len(a), pb.dim % len(b)
    return str(a[da]) == str(b[db]) and str(math.prod(a[da + 1:])) == str(math.prod(b[db + 1:]))


def _shape(node: fx.Node):
    return getattr(node.meta.get("val"), "shape", None)


def _replace_dim(layout: ir.Layout, dim: int) -> ir.Layout:
    return dataclasses.replace(layout, dim=dim)


def whole_value(node: fx.Node, pieces: list[torch.Tensor], *, gradient: bool = False,
                layout: ir.Layout | None = None) -> torch.Tensor:
    """The value the whole model would have, from each tp rank's (in rank order): a shard is
    concatenated (a fused product's by its segments), a partial sum summed (its gradient is
    whole on every rank), the rest taken from rank 0."""
    p = tp_placement(node)
    if p is None or len(pieces) == 1:
        return pieces[0]
    if p.kind == "shard":
        return layout.full(pieces) if layout is not None else torch.cat(pieces, p.dim)
    if p.kind == "partial" and not gradient:
        return torch.stack(pieces).sum(0)
    return pieces[0]


def merge_ranks(gm: fx.GraphModule, runs_by_rank: list[Run]) -> Run:
    """One Run for the whole model from the tp ranks' Runs (rank order)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    segmented = segmented_values(gm) if len(runs_by_rank) > 1 else {}
    merged = Run(outputs=[])
    for kind in ("values", "grads"):
        table = getattr(merged, kind)
        for name in getattr(runs_by_rank[0], kind):
            pieces = [getattr(r, kind).get(name) for r in runs_by_rank]
            if name not in nodes or any(p is None for p in pieces):
                continue
            table[name] = whole_value(nodes[name], pieces, gradient=kind == "grads", layout=segmented.get(name))
    returned = pytree.tree_leaves(gm.graph.output_node().args[0])
    whole = [merged.values.get(n.name) if isinstance(n, fx.Node) else None for n in returned]
    merged.outputs = whole if whole and all(v is not None for v in whole) else runs_by_rank[0].outputs
    return merged
