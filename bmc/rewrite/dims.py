"""Follow one dimension of an activation (tp's split dim, prune-heads' heads) op by op, and
rewrite the sizes ops bake for it.

The rules are one table: for each op, where the tracked dim goes in the output and which
argument bakes a size that must change with it. What differs between the passes that walk a
dim is a policy (`DimPolicy`): what is carried per tensor, how a baked size is rescaled, where
a view lands the dim, how a split along the dim is rewritten, and how a refusal is worded.
Which input a node is followed from (and any rewrite where inputs meet) stays with the pass.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, NoReturn, Protocol

import torch
import torch.fx as fx

from bmc import ir
from bmc.analysis.graph_patterns import hinted_shape, view_groups

aten = torch.ops.aten


@dataclass(frozen=True)
class ViewGroup:
    """The run of source dims holding the tracked dim and the run of result dims a view
    regroups them into (equal products)."""

    before: list[int]
    after: list[int]
    src_dims: list[int]
    dst_dims: list[int]


class DimPolicy(Protocol):
    """What a pass decides for the walk; `carried` is whatever it keeps per tensor."""

    noun: str  # names the tracked dim in refusals: "the {noun} dim ..."

    def dim(self, carried: Any) -> int:
        """The tracked dim of a tensor carrying `carried`."""

    def at(self, carried: Any, dim: int) -> Any:
        """The same, moved to `dim`."""

    def rescale(self, size: int, carried: Any, node: fx.Node) -> int:
        """A size baked for the tracked dim (or the dims viewed with it), after the rewrite."""

    def land(self, node: fx.Node, carried: Any, view: ViewGroup) -> tuple[int, Any]:
        """The result dim a view puts the tracked dim in, and what the result carries."""

    def split_along(self, node: fx.Node, carried: Any, along: int, pieces: int) -> tuple[tuple, bool]:
        """A split along the tracked dim: what each piece carries, and whether the node was
        rewritten."""

    def refuse(self, node: fx.Node, why: str) -> NoReturn:
        """Raise the pass's one-line error for `node`."""

    # Optional: a policy without it refuses slices along the tracked dim.
    # def slice_along(self, node, carried, start: int, end: int) -> tuple[Any, bool]:
    #     """A slice [start, end) along the tracked dim (bounds clamped to the size): what
    #     the piece carries, and whether the node was rewritten."""


@dataclass
class _Step:
    """One node being followed from its input `src`, which carries `carried`."""

    follower: DimFollower
    node: fx.Node
    src: fx.Node
    carried: Any

    @property
    def policy(self) -> DimPolicy:
        return self.follower.policy

    @property
    def dim(self) -> int:
        return self.policy.dim(self.carried)

    @property
    def rank_in(self) -> int:
        return len(hinted_shape(self.src))

    def to(self, dim: int) -> Any:
        return self.policy.at(self.carried, dim)

    def refuse(self, why: str) -> NoReturn:
        self.policy.refuse(self.node, why)

    def axes(self) -> list[int]:
        """The dims the op works along (its second argument; all of them when it is None)."""
        axes = self.node.args[1] if len(self.node.args) > 1 else 0
        if axes is None:
            return list(range(self.rank_in))
        return [a % self.rank_in for a in (axes if isinstance(axes, (list, tuple)) else [axes])]

    def rescale_shape(self, at: int) -> None:
        """Rescale entry `at` of the shape the node bakes (its second argument); -1 is inferred."""
        shape = list(self.node.args[1])
        if shape[at] == -1:
            return
        shape[at] = self.policy.rescale(shape[at], self.carried, self.node)
        self.node.args = (self.node.args[0], shape, *self.node.args[2:])
        self.follower.rewritten += 1


def _piece(step: _Step) -> Any:
    if not isinstance(step.carried, tuple):
        step.refuse("indexing a tensor that is not the pieces of a split")
    return step.carried[step.node.args[1]]


def _view(step: _Step) -> Any:
    """The tracked dim must be the outermost factor of the dims it is viewed with (size-1 dims
    aside); the policy says which result dim it lands in."""
    before, after = hinted_shape(step.src), hinted_shape(step.node)
    try:
        groups = view_groups(before, after)
    except ValueError:
        step.refuse("the view does not regroup dims")
    src_dims, dst_dims = next(g for g in groups if step.dim in g[0])
    if math.prod(before[i] for i in src_dims[:src_dims.index(step.dim)]) != 1:
        step.refuse(f"the {step.policy.noun} dim is not the outermost of the dims it is viewed with")
    at, landed = step.policy.land(step.node, step.carried, ViewGroup(before, after, src_dims, dst_dims))
    step.rescale_shape(at)
    return landed


def _expand(step: _Step) -> Any:
    at = step.dim + len(step.node.args[1]) - step.rank_in  # expand may prepend dims
    step.rescale_shape(at)
    return step.to(at)


def _transpose(step: _Step) -> Any:
    a, b = (d % step.rank_in for d in step.node.args[1:3])
    return step.to(b if step.dim == a else a if step.dim == b else step.dim)


def _permute(step: _Step) -> Any:
    return step.to([d % step.rank_in for d in step.node.args[1]].index(step.dim))


def _unsqueeze(step: _Step) -> Any:
    k = step.node.args[1] % (step.rank_in + 1)
    return step.to(step.dim + 1 if k <= step.dim else step.dim)


def _split(step: _Step) -> tuple:
    node = step.node
    along = (node.args[2] if len(node.args) > 2 else 0) % step.rank_in
    val = node.meta.get("val")
    pieces = len(val) if isinstance(val, (list, tuple)) else 1
    if along != step.dim:
        return tuple([step.carried] * pieces)
    parts, rewritten = step.policy.split_along(node, step.carried, along, pieces)
    step.follower.rewritten += rewritten
    return parts


def _across(step: _Step) -> Any:
    """Ops that work along some dims (slice, softmax, a reduction, cat, ...): never the tracked one."""
    if step.dim in step.axes():
        step.refuse(f"it works along the {step.policy.noun} dim")
    return step.carried


def _slice(step: _Step) -> Any:
    """A slice along another dim keeps the tracked one; along it, the policy says whether the
    piece is one it can rewrite (a part of a fused projection, say)."""
    node = step.node
    along, start, end, stride = (list(node.args[1:]) + [0, 0, None, 1][len(node.args) - 1:])[:4]
    if (along or 0) % step.rank_in != step.dim:
        return step.carried
    slice_along = getattr(step.policy, "slice_along", None)
    size = hinted_shape(step.src)[step.dim]
    if slice_along is None or stride not in (None, 1) or not isinstance(start or 0, int) \
            or not isinstance(end if end is not None else size, int):
        step.refuse(f"it works along the {step.policy.noun} dim")
    start, end = (max(0, min(size, v + size if v < 0 else v)) for v in (start or 0, size if end is None else end))
    carried, rewritten = slice_along(node, step.carried, start, end)
    step.follower.rewritten += rewritten
    return carried


def _select(step: _Step) -> Any:
    _across(step)
    return step.to(step.dim - 1 if step.axes()[0] < step.dim else step.dim)  # select drops its dim


def _attention(step: _Step) -> Any:
    if step.dim != step.rank_in - 3:
        step.refuse(f"the {step.policy.noun} dim is not attention's heads dim")
    return step.carried


def _elementwise(step: _Step) -> Any:
    """Anything else whose output has at least its input's rank: elementwise, broadcast from
    the right (matmul's batch dims alike)."""
    out = ir.tensor_val(step.node)
    if isinstance(out, torch.Tensor) and out.dim() >= step.rank_in:
        return step.to(step.dim + out.dim() - step.rank_in)
    step.refuse("no rule for this op")


RULES: dict[Any, Callable[[_Step], Any]] = {
    operator.getitem: _piece,
    aten.view.default: _view,
    aten.reshape.default: _view,
    aten._unsafe_view.default: _view,
    aten.expand.default: _expand,
    aten.transpose.int: _transpose,
    aten.permute.default: _permute,
    aten.unsqueeze.default: _unsqueeze,
    aten.split.Tensor: _split,
    aten.split_with_sizes.default: _split,
    aten.chunk.default: _split,
    aten.select.int: _select,
    aten.slice.Tensor: _slice,
    aten.scaled_dot_product_attention.default: _attention,
    **dict.fromkeys((aten.softmax.int, aten._softmax.default, aten.cat.default,
                     aten.mean.dim, aten.sum.dim_IntList, aten.index_select.default), _across),
}


class DimFollower:
    """Applies the rule table under one policy, counting the nodes whose baked sizes it rewrote."""

    def __init__(self, policy: DimPolicy):
        self.policy = policy
        self.rewritten = 0

    def through(self, node: fx.Node, src: fx.Node, carried: Any) -> Any:
        """What `node`'s output carries, given that its input `src` carries `carried` (a split
        node's pieces carry a tuple, which getitem indexes)."""
        return RULES.get(node.target, _elementwise)(_Step(self, node, src, carried))
