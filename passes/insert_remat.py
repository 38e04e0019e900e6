"""insert-remat: recompute activations in backward instead of saving them (activation
checkpointing), on the graph: each repeated block becomes a submodule called through
torch.utils.checkpoint, so only the block's inputs are saved."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

from bmc import ir
from bmc.errors import PipelineError
from bmc.passmgr import Pass, PassResult, register_pass, register_preset
from bmc.structure import structure_of


@dataclass(frozen=True)
class RematOptions:
    # block: checkpoint every repeated block (the structure analysis finds them). Other
    # policies (selective, budget) are not implemented yet and are refused when parsed.
    policy: Literal["block"] = "block"


def _block_nodes(gm: fx.GraphModule, block: str) -> dict[fx.Node, None]:
    """The computing nodes of one block, found by the module that produced them."""
    inside = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        path = ir.module_path(node)
        if path == block or path.startswith(block + "."):
            inside[node] = None
    return inside


def _checkpoint_call(gm: fx.GraphModule, fused: fx.Node, block: str) -> fx.Node:
    """Replace `call_module(fused_N)` by `checkpoint(fused_N, *inputs, use_reentrant=False)`."""
    graph = gm.graph
    with graph.inserting_before(fused):
        submodule = graph.get_attr(str(fused.target))
        call = graph.call_function(torch.utils.checkpoint.checkpoint, (submodule, *fused.args),
                                   {"use_reentrant": False})
    call.meta.update({k: v for k, v in fused.meta.items() if k in ir.CARRIED_META})
    ir.annotate(call, ir.Remat("block", block))
    ir.annotate(call, ir.Origin("insert-remat", block))
    fused.replace_all_uses_with(call)
    graph.erase_node(fused)
    return call


def _output_val(sub: fx.GraphModule):
    """What the fused submodule returns, from the meta of the nodes it returns."""
    out = sub.graph.output_node().args[0]
    vals = [a.meta.get("val") if isinstance(a, fx.Node) else a for a in out]
    return tuple(vals)


@register_pass("insert-remat", options=RematOptions, invalidates=("cost",))
class InsertRemat(Pass):
    """Recompute activations in backward: checkpoint each repeated block (policy=block)."""

    def run(self, gm: fx.GraphModule) -> PassResult:
        blocks = structure_of(gm).blocks
        if not blocks:
            raise PipelineError("insert-remat found no repeated blocks to checkpoint in this model "
                                "(bmc-opt --analyze shows what the structure analysis sees)")
        found = [(b.name, _block_nodes(gm, b.name)) for b in blocks]
        found = [(name, nodes) for name, nodes in found if nodes]
        # fuse_by_partitions names the i-th partition's submodule f"{prefix}{i}"
        gm = fuse_by_partitions(gm, [nodes for _, nodes in found], prefix="remat_block_", always_return_tuple=True)
        by_target = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
        for index, (name, _) in enumerate(found):
            node = by_target[f"remat_block_{index}"]
            node.meta["val"] = _output_val(gm.get_submodule(str(node.target)))
            node.meta["nn_module_stack"] = {}
            _checkpoint_call(gm, node, name)
        fused = found
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True, {"blocks-checkpointed": len(fused)})


register_preset("ckpt", "insert-remat{policy=block}", "checkpoint every repeated block (recompute in backward)")
