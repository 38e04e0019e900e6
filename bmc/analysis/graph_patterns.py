"""Graph patterns shared by analyses and rewrites: ATen op tables matched by packet name, and
walks backwards and forwards through data movement (views, head splits, RoPE) between ops."""
from __future__ import annotations

import operator
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from bmc.ir.schema import tensor_val

# ---------------------------------------------------------------------------- op tables
# Ops are matched by their ATen packet name ("linear" for aten.linear.default), so every
# overload (to.dtype, to.dtype_layout, ...) counts alike.

_SDPA = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
         "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
         "_scaled_dot_product_cudnn_attention"}
_SOFTMAX = {"softmax", "_softmax", "_safe_softmax"}
_MATMUL = {"matmul", "bmm", "mm"}
_NORM_OPS = {"layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm", "group_norm",
             "native_group_norm", "batch_norm", "native_batch_norm"}
_EMBEDDING = {"embedding"}
_ATTENTION_OPS = _SDPA | _SOFTMAX | _MATMUL

# Data movement that keeps a value "the same tensor" for tracing producers and consumers.
_RESHAPE = {"view", "reshape", "_unsafe_view", "transpose", "permute", "t", "contiguous", "clone",
            "expand", "expand_as", "unsqueeze", "squeeze", "flatten", "unflatten", "alias", "to",
            "_to_copy", "type_as", "dropout", "native_dropout", "detach", "getitem", "repeat",
            "repeat_interleave"}
# ... plus what lies between a projection and the attention op: head splits, RoPE
# (mul/add/neg/cat of halves), scaling, per-head norms.
_TO_ATTENTION = _RESHAPE | {"split", "split_with_sizes", "chunk", "unbind", "slice", "select", "index_select",
                            "narrow", "mul", "div", "add", "sub", "neg", "cat", "stack"}
# What lies between q @ k^T and softmax: scale, mask, casts.
_SCORES = _RESHAPE | {"mul", "div", "add", "sub", "where", "masked_fill", "tanh"}
# Comparisons of two position tensors (q_idx >= kv_idx) or triangles make a mask causal.
_CAUSAL_MASK_OPS = {"le", "lt", "ge", "gt", "tril", "triu"}

_ACTIVATIONS = {"gelu", "silu", "relu", "sigmoid", "tanh", "erf", "leaky_relu", "elu", "selu",
                "celu", "hardswish", "hardsigmoid", "mish", "softplus", "relu6", "hardtanh"}


def _op(node: fx.Node) -> str:
    """"linear" for aten.linear.<any overload>, "getitem" for operator.getitem, "" otherwise."""
    if node.op != "call_function":
        return ""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.__name__
    if target is operator.getitem:
        return "getitem"
    return getattr(target, "__name__", "")


def _named_args(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name (so sdpa variants with other orders read alike)."""
    named = dict(node.kwargs)
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        for arg, value in zip(schema.arguments, node.args):
            named[arg.name] = value
    return named


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    # Only tensor-valued inputs: sym_size nodes under dynamic shapes lead back to the inputs
    # without carrying any data dependence worth following.
    return [n for n in node.all_input_nodes if n.op == "get_attr" or isinstance(n.meta.get("val"), torch.Tensor)
            or (n.op == "call_function" and isinstance(n.meta.get("val"), (tuple, list)))]


def _int(size: Any) -> int | None:
    if isinstance(size, int):
        return size
    try:
        return int(size)  # a SymInt that is a known constant
    except Exception:  # noqa: BLE001 - a truly symbolic size
        return None


def _walk_back(start: fx.Node, through: Callable[[fx.Node], bool], stop: Callable[[fx.Node], bool],
               ) -> tuple[list[fx.Node], dict[fx.Node, fx.Node | None]]:
    """Breadth-first producers of `start`: nodes for which `stop` holds are collected (and not
    passed), nodes for which `through` holds are passed. Returns the stops in the order met
    and each visited node's successor towards `start` (to rebuild paths)."""
    found: list[fx.Node] = []
    toward: dict[fx.Node, fx.Node | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if stop(node):
            found.append(node)
            continue
        if node is not start and not through(node):
            continue
        for inp in _tensor_inputs(node):
            if inp not in toward:
                toward[inp] = node
                queue.append(inp)
    return found, toward


def _path(toward: dict[fx.Node, fx.Node | None], node: fx.Node) -> list[fx.Node]:
    """From `node` (a stop) forward to the walk's start."""
    path = [node]
    while toward.get(path[-1]) is not None:
        path.append(toward[path[-1]])
    return path


def _walk_forward(start: fx.Node, through: Callable[[fx.Node], bool], stop: Callable[[fx.Node, fx.Node], bool],
                  ) -> fx.Node | None:
    """The first consumer (breadth-first) of `start` for which stop(consumer, its input) holds."""
    seen = {start}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for user in node.users:
            if stop(user, node):
                return user
            if user not in seen and through(user):
                seen.add(user)
                queue.append(user)
    return None


def _ancestor_ops(node: fx.Node, limit: int = 2000) -> tuple[set[str], bool]:
    """The op names among `node`'s tensor ancestors, and whether any is a graph input or a
    parameter/buffer (a mask that the graph does not construct)."""
    ops: set[str] = set()
    external = False
    seen = {node}
    queue = deque([node])
    while queue and len(seen) < limit:
        n = queue.popleft()
        if n.op in ("placeholder", "get_attr"):
            external = True
            continue
        name = _op(n)
        if name in ("le", "lt", "ge", "gt") and getattr(n.target, "_overloadname", "") != "Tensor":
            name += ".Scalar"  # x >= 0 is a padding test, not an ordering of positions
        ops.add(name)
        for inp in _tensor_inputs(n):
            if inp not in seen:
                seen.add(inp)
                queue.append(inp)
    return ops, external


# ---------------------------------------------------------------------------- sizes and views

def _size_hint(size) -> int:
    return int(size) if isinstance(size, int) else int(size.node.hint)


def hinted_shape(node: fx.Node) -> list[int]:
    """The node's shape with symbolic sizes at their example values."""
    return [_size_hint(s) for s in tensor_val(node).shape]


def view_groups(src: list[int], dst: list[int]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of source dims with runs of destination dims of equal product (how a view
    regroups dims)."""
    groups, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        gi, gj = [i] if i < len(src) else [], [j] if j < len(dst) else []
        pi = src[i] if i < len(src) else 1
        pj = dst[j] if j < len(dst) else 1
        i, j = i + bool(gi), j + bool(gj)
        while pi != pj:
            if pi < pj and i < len(src):
                pi *= src[i]
                gi.append(i)
                i += 1
            elif j < len(dst):
                pj *= dst[j]
                gj.append(j)
                j += 1
            else:
                raise ValueError("shapes do not regroup")
        groups.append((gi, gj))
    return groups


def is_free(node: fx.Node, memo: dict[fx.Node, bool]) -> bool:
    """True for values computed from weights, buffers and constants alone: every stage that
    reads one recomputes it instead of receiving it."""
    if node in memo:
        return memo[node]
    if node.op == "get_attr":
        result = True
    elif node.op != "call_function":
        result = False
    else:
        result = all(is_free(a, memo) for a in node.all_input_nodes)
    memo[node] = result
    return result


# ---------------------------------------------------------------------------- fused projections

@dataclass(frozen=True)
class Pieces:
    """How the graph takes a projection's output features apart: viewed (or not) into
    `groups` equal blocks, each cut into the runs `bounds` ([start, end) within a block) by
    `how` ("split", "chunk", "slice"); `nodes[i]` is the node yielding piece i (a split's
    getitem or a slice), None for a piece nothing reads."""

    groups: int
    bounds: tuple[tuple[int, int], ...]
    how: str
    nodes: tuple[fx.Node | None, ...]

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(end - start for start, end in self.bounds)


# Ops that keep every element where it is (for following the feature dim of a projection).
_SAME_ELEMENTS = {"contiguous", "clone", "to", "_to_copy", "alias", "detach", "type_as"}
_CUTS = {"split", "split_with_sizes", "chunk"}


def taken_apart(projection: fx.Node) -> Pieces | None:
    """How `projection`'s output is cut into pieces along its features, read from the
    graph: followed through views that keep the features whole or divide them into equal
    blocks (GPT-NeoX's view(B, S, heads, 3 * head_dim)), transposes and copies, up to a
    split/chunk along them, or slices of them that tile the features. None when the output
    goes anywhere else first, or the pieces do not tile the features exactly."""
    node, dim, groups = projection, len(hinted_shape(projection)) - 1, 1
    while True:
        users = [u for u in node.users if _op(u) != "_assert_tensor_metadata"]
        if users and all(_op(u) == "slice" for u in users):
            return _slices(node, users, dim, groups)
        if len(users) != 1:
            return None
        (user,) = users
        if _op(user) in _CUTS:
            return _cut(node, user, dim, groups)
        moved = _feature_dim_after(user, node, dim, groups)
        if moved is None:
            return None
        node, (dim, groups) = user, moved


def _feature_dim_after(node: fx.Node, src: fx.Node, dim: int, groups: int) -> tuple[int, int] | None:
    """Where the tracked feature dim of `src` is in `node`'s output, and into how many equal
    blocks views have divided it so far; None if `node` moves the features any other way."""
    op, rank = _op(node), len(hinted_shape(src))
    if op in _SAME_ELEMENTS:
        return dim, groups
    if op == "transpose":
        a, b = (d % rank for d in node.args[1:3])
        return (b if dim == a else a if dim == b else dim), groups
    if op == "permute":
        return [d % rank for d in node.args[1]].index(dim), groups
    if op == "unsqueeze":
        k = node.args[1] % (rank + 1)
        return (dim + 1 if k <= dim else dim), groups
    if op not in ("view", "reshape", "_unsafe_view"):
        return None
    before, after = hinted_shape(src), hinted_shape(node)
    try:
        regrouped = view_groups(before, after)
    except ValueError:
        return None
    src_dims, dst_dims = next(g for g in regrouped if dim in g[0])
    if [d for d in src_dims if before[d] != 1] != [dim]:
        return None  # merged with other dims: the features are no longer a run of their own
    kept = [d for d in dst_dims if after[d] != 1]
    if len(kept) == 1:
        return kept[0], groups
    if len(kept) == 2 and groups == 1:
        return kept[1], after[kept[0]]  # [features] -> [blocks, features per block]
    return None


def _slices(node: fx.Node, users: list[fx.Node], dim: int, groups: int) -> Pieces | None:
    size = hinted_shape(node)[dim]
    runs: dict[tuple[int, int], fx.Node] = {}
    for user in users:
        args = list(user.args) + [None] * (5 - len(user.args))
        along, start, end, step = args[1] if args[1] is not None else 0, args[2] or 0, args[3], args[4] or 1
        if along % len(hinted_shape(node)) != dim or step != 1:
            return None
        if not isinstance(start, int) or not (end is None or isinstance(end, int)):
            return None
        start, end = (max(0, min(size, v + size if v < 0 else v)) for v in (start, size if end is None else end))
        runs.setdefault((start, end), user)
    bounds = sorted(runs)
    if [b[0] for b in bounds] != [0] + [b[1] for b in bounds[:-1]] or bounds[-1][1] != size:
        return None  # overlapping, missing or empty runs: not a tiling of the features
    return Pieces(groups, tuple(bounds), "slice", tuple(runs[b] for b in bounds))


def _cut(node: fx.Node, cut: fx.Node, dim: int, groups: int) -> Pieces | None:
    along = _named_args(cut).get("dim", 0)
    pieces = cut.meta.get("val")
    if along % len(hinted_shape(node)) != dim or not isinstance(pieces, (list, tuple)):
        return None
    widths = [_int(p.shape[dim]) for p in pieces]
    if any(w is None for w in widths):
        return None
    starts = [sum(widths[:i]) for i in range(len(widths))]
    getitems = {u.args[1]: u for u in cut.users if _op(u) == "getitem"}
    return Pieces(groups, tuple((s, s + w) for s, w in zip(starts, widths)),
                  "chunk" if _op(cut) == "chunk" else "split", tuple(getitems.get(i) for i in range(len(widths))))
