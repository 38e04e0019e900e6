"""annotate-cost: put the cost model's FLOPs and bytes on every node."""
from __future__ import annotations

import torch.fx as fx

from bmc.analysis import cost
from bmc.passmgr.manager import Pass, PassResult, register_pass


@register_pass("annotate-cost", requires=("shapes",), provides=("cost",))
class AnnotateCost(Pass):
    """Annotate every node with bmc.cost: forward FLOPs, output bytes, bytes saved for backward."""

    def run(self, gm: fx.GraphModule) -> PassResult:
        count = cost.annotate(gm)
        flops = cost.forward_flops(gm)
        stats = {"nodes-annotated": count}
        if not flops.free_symbols:
            stats["forward-flops"] = int(flops)
        return PassResult(gm, False, stats)
