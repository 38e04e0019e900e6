"""The dim-following engine (bmc/rewrite/dims.py) on tiny exported modules, under a policy
that halves every size baked for the tracked dim (tp at degree 2, in miniature)."""
import pytest
import torch
import torch.fx as fx

from bmc.errors import PipelineError
from bmc.rewrite.dims import DimFollower, ViewGroup

aten = torch.ops.aten


class Halve:
    noun = "split"

    def dim(self, carried: int) -> int:
        return carried

    def at(self, carried: int, dim: int) -> int:
        return dim

    def rescale(self, size: int, carried: int, node: fx.Node) -> int:
        return size // 2

    def land(self, node: fx.Node, carried: int, view: ViewGroup) -> tuple[int, int]:
        at = next(j for j in view.dst_dims if view.after[j] > 1)
        return at, at

    def split_along(self, node: fx.Node, carried: int, along: int, pieces: int) -> tuple[tuple, bool]:
        node.args = (node.args[0], node.args[1] // 2, *node.args[2:])
        return tuple([carried] * pieces), True

    def refuse(self, node: fx.Node, why: str):
        raise PipelineError(f"test cannot follow the split through {node.target} ({node.name}): {why}")


class Lambda(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def follow(fn, shape: tuple[int, ...], dim: int):
    """Export `fn`, track `dim` of its input through every op; the graph, what each node
    carries, and the follower."""
    gm = torch.export.export(Lambda(fn), (torch.randn(shape),), strict=False).module()
    carried: dict[fx.Node, object] = {}
    follower = DimFollower(Halve())
    for node in gm.graph.nodes:
        if node.op == "placeholder" and "val" in node.meta:
            carried[node] = dim
        elif node.op == "call_function":
            src = next(a for a in node.all_input_nodes if a in carried)
            carried[node] = follower.through(node, src, carried[src])
    return gm, carried, follower


def only(gm: fx.GraphModule, target) -> fx.Node:
    (node,) = gm.graph.find_nodes(op="call_function", target=target)
    return node


@pytest.mark.parametrize("fn, shape, dim, target, lands, baked, rewritten", [
    # a view splitting the tracked dim keeps it outermost, and its size is rescaled
    (lambda x: x.view(2, 6, 4, 2), (2, 6, 8), 2, aten.view.default, 2, [2, 6, 2, 2], 1),
    # a view merging it with inner dims
    (lambda x: x.reshape(2, 6, 8), (2, 6, 4, 2), 2, aten.reshape.default, 2, [2, 6, 4], 1),
    # expand shifts it by the new leading dims
    (lambda x: x.expand(3, 2, 5, 8), (2, 1, 8), 2, aten.expand.default, 3, [3, 2, 5, 4], 1),
    # an inferred size (-1) is left alone
    (lambda x: x.expand(2, 5, -1), (2, 1, 8), 2, aten.expand.default, 2, [2, 5, -1], 0),
], ids=["view-splits", "view-merges", "expand", "expand-inferred"])
def test_ops_baking_a_shape_move_the_tracked_dim_and_rescale_its_size(fn, shape, dim, target, lands, baked,
                                                                      rewritten):
    gm, carried, follower = follow(fn, shape, dim)
    node = only(gm, target)
    assert carried[node] == lands
    assert list(node.args[1]) == baked
    assert follower.rewritten == rewritten


def test_transpose_then_permute_move_the_tracked_dim():
    gm, carried, follower = follow(lambda x: x.transpose(1, 2).permute(2, 0, 1), (2, 6, 8), dim=2)
    assert carried[only(gm, aten.transpose.int)] == 1
    assert carried[only(gm, aten.permute.default)] == 2
    assert follower.rewritten == 0


@pytest.mark.parametrize("along, size, halved, rewritten", [(1, 4, 2, 1), (0, 1, 1, 0)], ids=["along", "across"])
def test_split_rescales_its_sizes_only_along_the_tracked_dim(along, size, halved, rewritten):
    gm, carried, follower = follow(lambda x: x.split(size, dim=along), (2, 8), dim=1)
    split = only(gm, aten.split.Tensor)
    assert split.args[1] == halved
    assert carried[split] == (1, 1)
    assert [carried[u] for u in split.users] == [1, 1]
    assert follower.rewritten == rewritten


def test_select_before_the_tracked_dim_drops_it_by_one():
    gm, carried, _ = follow(lambda x: x.select(0, 1).softmax(-1), (2, 6, 8), dim=1)
    assert carried[only(gm, aten.select.int)] == 0


def test_a_view_merging_the_tracked_dim_as_an_inner_factor_is_refused_in_one_line():
    with pytest.raises(PipelineError) as raised:
        follow(lambda x: x.view(2, 48), (2, 6, 8), dim=2)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("test cannot follow the split through aten.view.default")
    assert message.endswith("the split dim is not the outermost of the dims it is viewed with")


def test_a_reduction_along_the_tracked_dim_is_refused():
    with pytest.raises(PipelineError, match="it works along the split dim"):
        follow(lambda x: x.sum(-1), (2, 6, 8), dim=2)
