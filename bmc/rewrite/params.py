"""Parameters in the graph: which ones train, marking them for data parallelism, slicing one."""
from __future__ import annotations

import torch
import torch.fx as fx

from bmc import ir
from bmc.ir.deferred import is_deferred


def trainable_parameter_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Parameters the graph reads that take gradients (tied names counted once)."""
    trainable = {name for name, p in gm.named_parameters(remove_duplicate=False) if p.requires_grad}
    return {name: node for name, node in ir.parameter_nodes(gm).items() if name in trainable and node.users}


def mark_data_parallel(gm: fx.GraphModule, stage: int, sharded: bool) -> int:
    params = trainable_parameter_nodes(gm)
    placement = ir.Placement("dp", "shard", 0) if sharded else ir.Placement("dp", "replicate")
    for node in params.values():
        ir.annotate(node, ir.Zero(stage))
        ir.place(node, placement)
    return len(params)


def slice_parameter(gm: fx.GraphModule, name: str, keep: torch.Tensor, dim: int) -> int:
    """Keep indices `keep` of parameter `name` along `dim`; the number of elements removed."""
    param = gm.get_parameter(name)
    # a deferred weight (bmc/ir/deferred.py) reports the meta device: its index stays real, to replay
    where = keep.device if is_deferred(param) else param.device
    sliced = torch.nn.Parameter(param.detach().index_select(dim, keep.to(where)).clone(),
                                requires_grad=param.requires_grad)
    owner, _, leaf = name.rpartition(".")
    setattr(gm.get_submodule(owner) if owner else gm, leaf, sliced)
    return param.numel() - sliced.numel()
