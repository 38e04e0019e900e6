"""insert-offload: keep what backward needs in CPU memory instead of the accelerator's.

what=activations: each repeated block becomes a submodule called through `offload_saved`,
under which every tensor autograd saves for backward is copied to CPU memory during forward
(pinned, asynchronously, when CUDA is available) and copied back when backward unpacks it,
as torch.autograd.graph.save_on_cpu does, except that tensors already on the CPU and leaves
that require grad (parameters, which stay resident anyway) are kept as they are, and a
tensor saved by several ops of the block is copied once.

what=optimizer: ZeRO-Offload's optimizer side (Ren et al. 2021): optimizer states and the
optimizer step live on the CPU. It is a runtime decision, not a graph rewrite: the pass only
records it in the offload plan (`ir.OffloadPlan.optimizer`), for the torch backend's optimizer to act on
(that runtime part lives in backends/, not here).

The offloaded calls carry bmc.origin = insert-offload(<block>), and the offload plan
(`ir.OffloadPlan.activations`) lists the offloaded blocks.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from bmc.rewrite.regions import (
    Ledger,
    HostSavedTensors,  # noqa: F401 - the runtime lives in the core; tests reach it here
    offload_saved,  # noqa: F401
    wrap_region,
    fuse_regions,
    ledger,
    repeated_blocks,
    trace_substitutions,
)
from torch import fx

from bmc import ir
from bmc.passmgr.manager import Pass, PassResult, register_pass
from bmc.passmgr.properties import Properties

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class OffloadOptions:
    # activations: saved activations of each repeated block in CPU memory between forward
    # and backward; optimizer: optimizer states and step on the CPU (set for the runtime)
    what: Literal["activations", "optimizer"] = "activations"


# ------------------------------------------------------------------ the pass

def _offload_activations(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, int]]:
    blocks = repeated_blocks(gm, "insert-offload{what=activations}")
    book: Ledger = ledger(gm, blocks, trace_substitutions(gm))
    gm, calls = fuse_regions(gm, [nodes for _, nodes in blocks], prefix="offload_block_")
    for (name, _), fused in zip(blocks, calls):
        wrap_region(gm, fused, ir.Region("offload", "insert-offload", "activations", name))
    _record(gm, activations=tuple(name for name, _ in blocks))
    gm.graph.lint()
    gm.recompile()
    names = list(book.plain)
    return gm, {"blocks-offloaded": len(blocks),
                "saved-bytes-before": int(book.total()),
                "saved-bytes-on-device-after": int(book.total(dropped=names)),
                "saved-bytes-to-host": int(sum(sum(book.plain[n].values()) for n in names))}


def _record(gm: fx.GraphModule, **changes) -> None:
    """Add to the offload plan (activations and the optimizer are offloaded by separate runs)."""
    current = ir.get_plan(gm, ir.OffloadPlan) or ir.OffloadPlan()
    ir.set_plan(gm, dataclasses.replace(current, **changes))


FUSE_ONCE = "keep one of insert-remat / insert-offload{what=activations} in the pipeline"


@register_pass("insert-offload", options=OffloadOptions, invalidates=("cost",))
class InsertOffload(Pass):
    """Offload to CPU memory: each block's saved activations, or (flag for the runtime) the optimizer."""

    def properties(self) -> Properties:
        if self.options.what == "optimizer":
            return Properties(invalidates=("cost",))
        return Properties(provides=("fused-regions",), invalidates=("cost",),
                          forbids=(("staged", ""), ("fused-regions", FUSE_ONCE)))

    def run(self, gm: fx.GraphModule) -> PassResult:
        if self.options.what == "optimizer":
            _record(gm, optimizer=True)
            log.info("insert-offload{what=optimizer}: optimizer states and step marked for the CPU")
            return PassResult(gm, True, {"optimizer-offloaded": 1})
        gm, stats = _offload_activations(gm)
        log.info("insert-offload{what=activations}: %s", stats)
        return PassResult(gm, True, stats)
