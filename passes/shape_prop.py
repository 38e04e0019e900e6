"""shape-prop: recompute every node's meta['val'] by fake-tensor propagation."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from bmc import ir
from bmc.passmgr import Pass, PassResult, register_pass


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
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)
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


@register_pass("shape-prop", provides=("shapes",))
class ShapeProp(Pass):
    """Recompute shapes and dtypes of every node by fake-tensor propagation (after rewrites)."""

    def run(self, gm: fx.GraphModule) -> PassResult:
        changed = propagate_shapes(gm)
        # Refreshing meta leaves the code as it was: not a modification of the program.
        return PassResult(gm, False, {"nodes": len(gm.graph.nodes), "shapes-changed": changed})
