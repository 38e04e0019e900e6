"""Order constraints between rewriting passes, checked when a pass runs, so a pipeline in an
order that cannot work fails with one line saying which order to use."""
from __future__ import annotations

import torch.fx as fx

from bmc.errors import PipelineError


def require_before_pp(gm: fx.GraphModule, pass_name: str) -> None:
    """Passes that rewrite the graph run before pp, which cuts it into stages."""
    if gm.meta.get("bmc.pp"):
        raise PipelineError(f"{pass_name} after pp: pp cuts the graph into stages and {pass_name} does not know "
                            f"about them; put {pass_name} before pp in the pipeline")


def require_before_regions(gm: fx.GraphModule, pass_name: str) -> None:
    """Passes that rewrite ops run before insert-remat / insert-offload, which fuse blocks into
    regions (submodules) whose insides other passes do not see."""
    fused = [n for n in gm.graph.find_nodes(op="get_attr") if isinstance(getattr(gm, str(n.target), None), fx.GraphModule)]
    if fused:
        raise PipelineError(f"{pass_name} must run before passes that fuse regions (insert-remat, insert-offload): "
                            f"put {pass_name} earlier in the pipeline")


def require_before_quant(gm: fx.GraphModule, pass_name: str) -> None:
    """Pruning slices fp32 weights: it runs before quant-int8 turns them into int8 buffers."""
    import torch
    if any(gm.graph.find_nodes(op="call_function", target=torch.ops.bmc.int8_linear.default)):
        raise PipelineError(f"{pass_name} after quant-int8: prune before quantizing (put {pass_name} before "
                            f"quant-int8 in the pipeline)")
