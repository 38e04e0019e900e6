"""shape-prop: recompute every node's meta['val'] by fake-tensor propagation."""
from __future__ import annotations

import torch.fx as fx

from bmc.ir.shapes import propagate_shapes
from bmc.passmgr.manager import Pass, PassResult, register_pass


@register_pass("shape-prop", provides=("shapes",))
class ShapeProp(Pass):
    """Recompute shapes and dtypes of every node by fake-tensor propagation (after rewrites)."""

    def run(self, gm: fx.GraphModule) -> PassResult:
        changed = propagate_shapes(gm)
        # Refreshing meta leaves the code as it was: not a modification of the program.
        return PassResult(gm, False, {"nodes": len(gm.graph.nodes), "shapes-changed": changed})
