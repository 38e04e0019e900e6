"""dp: data parallelism: replicate the parameters, average gradients over the dp group."""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from bmc import ir
from bmc.rewrite.params import mark_data_parallel
from bmc.errors import PipelineError
from bmc.passmgr.manager import Pass, PassResult, register_pass


@dataclass(frozen=True)
class DpOptions:
    # Gradients are reduced in buckets of about this many MB, launched as soon as a bucket
    # is full so the communication overlaps the rest of backward (as DDP does).
    bucket_mb: float = 25.0

    def __post_init__(self):
        if self.bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be > 0, got {self.bucket_mb}")


@register_pass("dp", options=DpOptions, provides=("data-parallel",))
class DataParallel(Pass):
    """Data parallelism: replicated parameters, gradients averaged over the dp group."""

    def check(self) -> None:
        if self.context.world_size < 1:
            raise PipelineError("dp needs a world size >= 1")

    def run(self, gm: fx.GraphModule) -> PassResult:
        count = mark_data_parallel(gm, stage=0, sharded=False)
        ir.set_plan(gm, ir.DataParallelPlan(0, self.options.bucket_mb))
        return PassResult(gm, True, {"params": count})
