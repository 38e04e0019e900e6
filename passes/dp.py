"""dp: data parallelism: replicate the parameters, average gradients over the dp group."""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from bmc import ir
from bmc.errors import PipelineError
from bmc.passmgr import Pass, PassResult, register_pass


@dataclass(frozen=True)
class DpOptions:
    # Gradients are reduced in buckets of about this many MB, launched as soon as a bucket
    # is full so the communication overlaps the rest of backward (as DDP does).
    bucket_mb: float = 25.0

    def __post_init__(self):
        if self.bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be > 0, got {self.bucket_mb}")


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


@register_pass("dp", options=DpOptions, provides=("data-parallel",))
class DataParallel(Pass):
    """Data parallelism: replicated parameters, gradients averaged over the dp group."""

    def check(self) -> None:
        if self.context.world_size < 1:
            raise PipelineError("dp needs a world size >= 1")

    def run(self, gm: fx.GraphModule) -> PassResult:
        count = mark_data_parallel(gm, stage=0, sharded=False)
        gm.meta["bmc.bucket_mb"] = self.options.bucket_mb
        return PassResult(gm, True, {"params": count})
