"""dce: dead-code elimination."""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from bmc.passmgr import Pass, PassResult, register_pass


@dataclass(frozen=True)
class DceOptions:
    # Unused parameters (get_attr nodes) are kept by default: dropping one changes the
    # module's state dict, which checkpoints and optimizers see.
    drop_unused_params: bool = False


@register_pass("dce", options=DceOptions, invalidates=("cost",))
class DeadCodeElimination(Pass):
    """Remove nodes whose results are never used (side-effecting ops are kept)."""

    def run(self, gm: fx.GraphModule) -> PassResult:
        before = len(gm.graph.nodes)
        # fx's own DCE knows which ops are impure (asserts, in-place, random with side effects)
        gm.graph.eliminate_dead_code()
        removed_params = self._drop_unused_attrs(gm) if self.options.drop_unused_params else 0
        removed = before - len(gm.graph.nodes)
        return PassResult(gm, removed > 0, {"nodes-removed": removed - removed_params,
                                            "params-removed": removed_params})

    @staticmethod
    def _drop_unused_attrs(gm: fx.GraphModule) -> int:
        unused = [n for n in gm.graph.find_nodes(op="get_attr") if not n.users]
        for node in unused:
            gm.graph.erase_node(node)
        gm.delete_all_unused_submodules()
        return len(unused)
