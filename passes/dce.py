"""dce: dead-code elimination."""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from bmc.passmgr.manager import Pass, PassResult, register_pass


@dataclass(frozen=True)
class DceOptions:
    # Parameters the graph no longer reads are kept by default: dropping one changes the
    # module's state dict, which checkpoints and optimizers see.
    drop_unused_params: bool = False


@register_pass("dce", options=DceOptions, invalidates=("cost",))
class DeadCodeElimination(Pass):
    """Remove nodes whose results are never used (side-effecting ops are kept)."""

    def run(self, gm: fx.GraphModule) -> PassResult:
        before = len(gm.graph.nodes)
        # fx's own DCE knows which ops are impure (asserts, in-place, random with side effects)
        gm.graph.eliminate_dead_code()
        removed_nodes = before - len(gm.graph.nodes)
        removed_params = self._drop_unread_parameters(gm) if self.options.drop_unused_params else 0
        return PassResult(gm, removed_nodes + removed_params > 0,
                          {"nodes-removed": removed_nodes, "params-removed": removed_params})

    @staticmethod
    def _drop_unread_parameters(gm: fx.GraphModule) -> int:
        read = {str(n.target) for n in gm.graph.find_nodes(op="get_attr")}
        read_tensors = {id(gm.get_parameter(n)) for n in read if n in dict(gm.named_parameters())}
        # A tied weight appears under several names while the graph reads one: keep its aliases.
        unread = [name for name, p in gm.named_parameters(remove_duplicate=False)
                  if name not in read and id(p) not in read_tensors]
        for name in unread:
            owner_name, _, leaf = name.rpartition(".")
            delattr(gm.get_submodule(owner_name) if owner_name else gm, leaf)
        return len(unread)
