"""Shape propagation: recompute every node's meta['val'] by fake-tensor propagation."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from bmc.ir import plans
from bmc.ir.deferred import is_deferred
from bmc.ir import schema as ir


class _LocalShapes(FakeTensorProp):
    """Fake-tensor propagation that reads a tensor-parallel split weight as a rank's slice
    (the module keeps it whole until a backend loads the program)."""

    def __init__(self, gm: fx.GraphModule, mode, local: dict[str, tuple[int, ...]]):
        super().__init__(gm, mode)
        self.local = local

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        if is_deferred(value):  # it will be read onto the cpu (where the graph runs): a cpu fake of it
            with self._mode:
                value = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="cpu")
        shape = self.local.get(str(target))
        if shape is not None and tuple(value.shape) != shape:
            return value.new_empty(shape)
        return value


def local_shapes(gm: fx.GraphModule) -> dict[str, tuple[int, ...]]:
    """A rank's shape of every weight the tp plan splits (what its graph node says), by name."""
    tp = plans.get_plan(gm, plans.TensorParallelPlan)
    split = set(tp.split_params) if tp is not None else set()
    return {str(n.target): tuple(n.meta["val"].shape) for n in gm.graph.find_nodes(op="get_attr")
            if str(n.target) in split and isinstance(n.meta.get("val"), torch.Tensor)}


def _same_type(old, new) -> bool:
    if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor):
        return old.dtype == new.dtype and [str(s) for s in old.shape] == [str(s) for s in new.shape]
    if isinstance(old, (tuple, list)) and isinstance(new, (tuple, list)):
        return len(old) == len(new) and all(_same_type(a, b) for a, b in zip(old, new))
    return type(old) is type(new)


def propagate_shapes(gm: fx.GraphModule) -> int:
    """Recompute every node's meta['val'] by fake-tensor propagation; returns how many
    nodes' shape or dtype changed."""
    inputs = [n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder")]
    # Reuse the graph's own fake mode so symbolic dims (B, S) keep their symbols.
    mode = detect_fake_mode(inputs) or FakeTensorMode(allow_non_fake_inputs=True)
    before = {n: n.meta.get("val") for n in gm.graph.nodes}
    previous = mode.allow_non_fake_inputs
    mode.allow_non_fake_inputs = True  # parameters are real (or meta) tensors
    try:
        _LocalShapes(gm, mode, local_shapes(gm)).propagate_dont_convert_inputs(*inputs)
    finally:
        mode.allow_non_fake_inputs = previous
    output = gm.graph.output_node()
    output.meta["val"] = torch.utils._pytree.tree_map(
        lambda a: a.meta.get("val") if isinstance(a, fx.Node) else a, output.args[0])
    changed = sum(1 for n in gm.graph.nodes
                  if n.op != "output" and not _same_type(before.get(n), n.meta.get("val")))
    for node in gm.graph.nodes:  # export's tensor_meta is stale now; val is what holds
        if "tensor_meta" in node.meta and isinstance(ir.tensor_val(node), torch.Tensor):
            node.meta.pop("tensor_meta")
    return changed
