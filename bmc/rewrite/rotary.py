"""Rotary position embeddings as one op: HF's `q * cos + rotate_half(q) * sin`, traced into
two slices, a neg, a cat, two muls and an add per query and per key, matched and replaced by
`bmc::rotary` (ONNX Runtime's com.microsoft RotaryEmbedding, ort_ops).

What is proven before a replacement, from the graph alone:
- rotate_half: cat([-x[..., h:], x[..., :h]], -1) of the same x, h = D / 2;
- cos and sin are [B, T, D] values unsqueezed at dim 1 against x [B, heads, T, D], with the
  same B and T as x;
- both halves of cos (and of sin) are equal: each is traced back through elementwise ops to
  a cat([f, f], -1) of one value (HF's `emb = cat((freqs, freqs))`), so the half tables the
  op reads lose nothing.
A rotary that does not prove all of this (another layout, partial rotary written otherwise,
interleaved pairs) stays as traced: correct, only slower.

The op reads [rows, D/2] tables indexed by per-token positions; the tables here are the
traced cos/sin themselves, flattened to one row per token, and the positions 0..B*T-1 (made
once per step from cos, which every layer shares).
"""
from __future__ import annotations

import torch
import torch.fx as fx

import bmc.ir.ops  # noqa: F401 - registers bmc::rotary
from bmc import ir

aten = torch.ops.aten
ROTARY = torch.ops.bmc.rotary.default
TABLES = "rotary_tables"  # a bmc::rotary node's meta: the traced (cos, sin) [B or 1, T, D] it reads
_END = 2 ** 62  # slices to "the end" are traced with end = sys.maxsize
# elementwise ops a cos/sin table is computed through, with the argument that carries it
_ELEMENTWISE = {aten.cos.default: 0, aten.sin.default: 0, aten.to.dtype: 0, aten._to_copy.default: 0,
                aten.clone.default: 0, aten.mul.Tensor: 0, aten.mul.Scalar: 0}


def _call(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _shape(node):
    val = ir.tensor_val(node) if isinstance(node, fx.Node) else None
    return tuple(val.shape) if val is not None and val.dtype == torch.float32 else None


def _last(dim, rank: int) -> bool:
    return dim in (-1, rank - 1)


def _halves_equal(node) -> bool:
    """node's last dim is cat([f, f], -1) of one f, through elementwise ops with scalars."""
    while _call(node, *_ELEMENTWISE):
        if node.target in (aten.mul.Tensor, aten.mul.Scalar) and not isinstance(node.args[1], (int, float)):
            return False
        node = node.args[_ELEMENTWISE[node.target]]
    if not _call(node, aten.cat.default):
        return False
    parts, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
    shape = _shape(node)
    return shape is not None and len(parts) == 2 and parts[0] is parts[1] and _last(dim, len(shape))


def _rotate_half_of(node) -> fx.Node | None:
    """x when node = cat([neg(x[..., h:]), x[..., :h]], -1) with h = x.shape[-1] / 2."""
    if not _call(node, aten.cat.default) or len(node.args[0]) != 2:
        return None
    (negated, first), dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
    if not _call(negated, aten.neg.default):
        return None
    second = negated.args[0]
    if not (_call(first, aten.slice.Tensor) and _call(second, aten.slice.Tensor) and first.args[0] is second.args[0]):
        return None
    x = first.args[0]
    shape = _shape(x)
    if shape is None or not isinstance(shape[-1], int) or shape[-1] % 2 or not _last(dim, len(shape)):
        return None
    half = shape[-1] // 2

    def spans(s, start, end) -> bool:
        _, s_dim, s_start, s_end = (list(s.args) + [None] * 4)[:4]
        s_end = shape[-1] if s_end is None or s_end >= _END or s_end >= shape[-1] else s_end
        return _last(s_dim, len(shape)) and (s_start or 0) == start and s_end == end
    return x if spans(first, 0, half) and spans(second, half, shape[-1]) else None


def _table(node, x_shape) -> fx.Node | None:
    """t when node = t.unsqueeze(1), t [B or 1, T, D] against x [B, heads, T, D], its halves
    equal."""
    if not _call(node, aten.unsqueeze.default) or node.args[1] != 1:
        return None
    table = node.args[0]
    shape = _shape(table)
    # sizes compared by their expressions: the same symbol, or the same number
    if shape is None or len(shape) != 3 or str(shape[0]) not in ("1", str(x_shape[0])) \
            or [str(d) for d in shape[1:]] != [str(x_shape[i]) for i in (2, 3)]:
        return None
    return table if _halves_equal(table) else None


def _products(node) -> list[tuple]:
    if not _call(node, aten.mul.Tensor):
        return []
    a, b = node.args
    return [(a, b), (b, a)]


def _match(node: fx.Node) -> tuple | None:
    """(x, cos table, sin table) of x * cos + rotate_half(x) * sin ending at `node`."""
    if not _call(node, aten.add.Tensor) or len(node.args) != 2:
        return None
    for plain, rotated in (node.args, node.args[::-1]):
        for x, cos in _products(plain):
            shape = _shape(x)
            if shape is None or len(shape) != 4:
                continue
            for turned, sin in _products(rotated):
                if _rotate_half_of(turned) is x:
                    tables = _table(cos, shape), _table(sin, shape)
                    if None not in tables:
                        return x, *tables
    return None


def fuse_rotaries(gm: fx.GraphModule, tokens: fx.Node) -> int:
    """Replace every proven rotate-half RoPE by bmc::rotary; how many were replaced. `tokens`
    is a [B, T] value (the step's input ids) whose sizes every rotated x [B, heads, T, D] must
    be proven to share: the per-token tables and positions are made at its shape."""
    graph, made, fused = gm.graph, {}, 0
    token_shape = [str(d) for d in ir.tensor_val(tokens).shape]
    for node in list(graph.nodes):
        found = _match(node)
        if found is None or [str(_shape(found[0])[i]) for i in (0, 2)] != token_shape:
            continue
        x, cos, sin = found
        if "positions" not in made:
            made["positions"] = _positions(graph, tokens)
        for table in (cos, sin):
            if table not in made:
                made[table] = _rows(graph, table, tokens)
        with graph.inserting_before(node):
            replacement = graph.call_function(ROTARY, (x, made["positions"], made[cos], made[sin]))
        ir.replace_node(node, replacement, "rotary")  # x*cos + rotate_half(x)*sin's meta, its uses
        replacement.meta[TABLES] = (cos, sin)  # for slot_rotary, which replaces the tables by constants
        fused += 1
    if fused:
        graph.eliminate_dead_code()
        gm.recompile()
    return fused


def _chain(graph: fx.Graph, after: fx.Node, meta_from: fx.Node, steps) -> list[fx.Node]:
    """Insert steps [(target, args(made) -> tuple, kwargs)] one after another after `after`."""
    made, anchor = [], after
    for target, arguments, kwargs in steps:
        with graph.inserting_after(anchor):
            anchor = graph.call_function(target, arguments(made), kwargs)
        anchor.meta.update({k: v for k, v in meta_from.meta.items() if k in ("nn_module_stack", "stack_trace")})
        made.append(anchor)
    return made


def _positions(graph: fx.Graph, tokens: fx.Node) -> fx.Node:
    """b * T + t for every token of a [B, T] value: row (b, t) of the flattened tables. Counted
    with tensor ops only (no sizes), so it crosses the lowering's part boundaries as one
    tensor."""
    made = _chain(graph, tokens, tokens, [
        (aten.ones_like.default, lambda m: (tokens,), {"dtype": torch.int64}),
        (aten.cumsum.default, lambda m: (m[0], 1), {}),                  # t + 1
        (aten.sum.dim_IntList, lambda m: (m[0], [1], True), {}),         # T, [B, 1]
        (aten.cumsum.default, lambda m: (m[2], 0), {}),                  # (b + 1) * T
        (aten.sub.Tensor, lambda m: (m[3], m[2]), {}),                   # b * T
        (aten.add.Tensor, lambda m: (m[1], m[4]), {}),
        (aten.sub.Tensor, lambda m: (m[5], 1), {})])
    return made[-1]


def _rows(graph: fx.Graph, table: fx.Node, tokens: fx.Node) -> fx.Node:
    """The first half of table [B or 1, T, D] at the tokens' batch, as [B*T, D/2] rows. The
    batch is made explicit by multiplying with ones (exact): a table traced at batch 1 may be
    one row for all or one per row when run."""
    half = _shape(table)[-1] // 2
    after = max(table, tokens, key=list(graph.nodes).index)
    made = _chain(graph, after, table, [
        (aten.ones_like.default, lambda m: (tokens,), {"dtype": torch.float32}),
        (aten.unsqueeze.default, lambda m: (m[0], -1), {}),
        (aten.mul.Tensor, lambda m: (table, m[1]), {}),
        (aten.slice.Tensor, lambda m: (m[2], -1, 0, half), {}),
        (aten.reshape.default, lambda m: (m[3], [-1, half]), {})])
    return made[-1]
