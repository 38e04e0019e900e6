"""zero: ZeRO data parallelism (Rajbhandari et al. 2020): shard optimizer states (stage 1),
gradients too (stage 2), and parameters too (stage 3) over the dp group."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.fx as fx

import bmc.ir.ops  # noqa: F401 - registers the bmc:: ops the rewrite inserts
from bmc import ir
from bmc.rewrite.params import mark_data_parallel, trainable_parameter_nodes
from bmc.passmgr.manager import Pass, PassResult, register_pass, register_preset
from bmc.passmgr.properties import Properties


@dataclass(frozen=True)
class ZeroOptions:
    stage: Literal[1, 2, 3] = 1
    # gradients are reduced in buckets of about this size, asynchronously while backward goes
    # on; default 25 MB at stages 1-2 (as DDP), 4 MB at stage 3, whose buckets hold full
    # gathered gradients and should be reduced about a block at a time
    bucket_mb: Optional[float] = None
    # stage 3: how many weights ahead are all-gathered while the current one is in use
    # (a bound on the extra gathered memory), started in groups of half as many; 0: off
    prefetch: int = 8

    def __post_init__(self):
        if self.bucket_mb is not None and self.bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be > 0, got {self.bucket_mb}")
        if self.prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {self.prefetch}")


def gather_before_use(gm: fx.GraphModule, node: fx.Node, order: dict[fx.Node, int]) -> fx.Node:
    """Route every use of parameter `node` through a bmc::gather_param of its shard."""
    shape = [int(s) for s in node.meta["val"].shape]
    first_user = min(node.users, key=order.__getitem__)
    with gm.graph.inserting_before(first_user):
        gathered = gm.graph.call_function(torch.ops.bmc.gather_param.default, (node, shape, "dp"))
    node.replace_all_uses_with(gathered, delete_user_cb=lambda user: user is not gathered)
    ir.copy_meta(node, gathered, "zero")
    gathered.meta["nn_module_stack"] = first_user.meta.get("nn_module_stack", {})
    return gathered


ZERO3_AFTER_PP = ("zero{stage=3} with pp is not supported yet (ZeRO-3 gathers inside pipelined stages); "
                  "use zero{stage=1} or zero{stage=2} with pp")


@register_pass("zero", options=ZeroOptions, provides=("data-parallel",), invalidates=("cost",))
class Zero(Pass):
    """ZeRO data parallelism: shard optimizer states (1), gradients (2) and parameters (3) over dp."""

    def properties(self) -> Properties:
        if self.options.stage != 3:
            return super().properties()
        return Properties(provides=("data-parallel", "zero3"), invalidates=("cost",),
                          forbids=(("staged", ZERO3_AFTER_PP),))

    def run(self, gm: fx.GraphModule) -> PassResult:
        stage = self.options.stage
        count = mark_data_parallel(gm, stage=stage, sharded=stage == 3)
        default_bucket = 4.0 if stage == 3 else 25.0
        bucket = self.options.bucket_mb if self.options.bucket_mb is not None else default_bucket
        ir.set_plan(gm, ir.DataParallelPlan(stage, bucket, self.options.prefetch if stage == 3 else 0))
        gathers = 0
        if stage == 3:
            # program order of the original nodes; inserted gathers never become first users
            order = {n: i for i, n in enumerate(gm.graph.nodes)}
            for node in trainable_parameter_nodes(gm).values():
                gather_before_use(gm, node, order)
                gathers += 1
        return PassResult(gm, True, {"params": count, "gathers-inserted": gathers})


for _stage in (1, 2, 3):
    register_preset(f"zero{_stage}", f"zero{{stage={_stage}}}", f"ZeRO stage {_stage} data parallelism")
