"""verify: check the graph's invariants (lint, bmc annotations, shapes) without changing it."""
from __future__ import annotations

import torch.fx as fx

from bmc.passmgr.manager import Pass, PassResult, register_pass
from bmc.ir.verify import verify_graph


@register_pass("verify")
class Verify(Pass):
    """Check IR invariants (graph lint, bmc.* annotations, shapes, stages); change nothing."""

    def run(self, gm: fx.GraphModule) -> PassResult:
        verify_graph(gm)
        return PassResult(gm, False, {"nodes": len(gm.graph.nodes)})
