"""prune-ffn: remove MLP neurons — rows of the up (and gate) projections, the matching
columns of the down projection — in every block.

A neuron j contributes down[:, j] * act(up_j . x + b_j) (times the gate's j-th output); removing
it equals zeroing down[:, j] in the original. `ratio=R` removes round(R * width) neurons per
block, the lowest-scoring: `magnitude` scores neuron j by |up_j| * |down[:, j]| (and |gate_j|),
`random` draws them with `seed`. Widths of the intermediate activations follow by shape
propagation, and views inside the MLP that bake its width (HF GPT-2's Conv1D) are rewritten.
Every projection form the structure analysis knows is sliced alike: aten.linear and a matmul by
W.t() (W stored (out, in)), HF Conv1D's addmm and a matmul by W (stored (in, out)).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx

from bmc import ir
from bmc.errors import PipelineError
from bmc.ir.shapes import propagate_shapes
from bmc.rewrite.params import slice_parameter
from bmc.passmgr.manager import Pass, PassResult, register_pass
from bmc.analysis.structure import CACHE_KEY, MLP, Linear, structure_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneFfnOptions:
    ratio: float = 0.2
    score: Literal["magnitude", "random"] = "magnitude"
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.score not in ("magnitude", "random"):
            raise ValueError(f"score must be magnitude or random, got {self.score!r}")


def _rows(gm: fx.GraphModule, lin: Linear) -> torch.Tensor:
    """The projection's weight as [out, in] (HF Conv1D stores [in, out])."""
    w = gm.get_parameter(lin.weight).detach()
    return w.t() if lin.transposed else w


def neuron_scores(gm: fx.GraphModule, mlp: MLP, score: str, generator: torch.Generator) -> torch.Tensor:
    width = mlp.up.out_features
    if score == "random":
        return torch.rand(width, generator=generator)
    value = _rows(gm, mlp.up).float().norm(dim=1) * _rows(gm, mlp.down).float().norm(dim=0)
    if mlp.gate is not None:
        value = value * _rows(gm, mlp.gate).float().norm(dim=1)
    return value


def prune_mlp(gm: fx.GraphModule, mlp: MLP, keep: torch.Tensor) -> int:
    """Keep neurons `keep` (sorted): rows of up/gate (and their biases), columns of down."""
    removed = 0
    for lin in (p for p in (mlp.up, mlp.gate) if p is not None):
        removed += slice_parameter(gm, lin.weight, keep, 1 if lin.transposed else 0)
        if lin.bias is not None:
            removed += slice_parameter(gm, lin.bias, keep, 0)
    removed += slice_parameter(gm, mlp.down.weight, keep, 0 if mlp.down.transposed else 1)
    return removed


VIEWS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default)


def rewrite_widths(gm: fx.GraphModule, mlp: MLP, old: int, new: int) -> int:
    """Views inside the MLP that bake its width (HF's Conv1D views x as [..., width]) take the
    new one. The hidden size never equals the width here (checked), so no other dim is hit."""
    if old == mlp.up.in_features:
        raise PipelineError(f"prune-ffn: {mlp.module} is as wide as its input ({old}), so the views that bake "
                            f"its width cannot be told from the others")
    changed = 0
    for node in gm.graph.nodes:
        if node.target in VIEWS and (ir.module_path(node) + ".").startswith(mlp.module + "."):
            shape = list(node.args[1])
            if old in shape:
                node.args = (node.args[0], [new if d == old else d for d in shape], *node.args[2:])
                changed += 1
    return changed


@register_pass("prune-ffn", options=PruneFfnOptions, invalidates=("cost",),
               forbids=("staged", "fused-regions", "quantized"))
class PruneFfn(Pass):
    """Remove the lowest-scoring MLP neurons of every block."""

    def run(self, gm: fx.GraphModule) -> PassResult:
        mlps = [b.mlp for b in structure_of(gm).blocks if b.mlp is not None]
        if not mlps:
            raise PipelineError("prune-ffn: the structure analysis found no MLP in this model's blocks")
        generator = torch.Generator().manual_seed(self.options.seed)
        removed = neurons = 0
        record = ir.get_plan(gm, ir.PrunePlan) or ir.PrunePlan()
        kept = {m: list(ix) for m, ix in record.kept_neurons().items()}  # MLP -> the neurons kept (original ids)
        for mlp in mlps:
            width = mlp.up.out_features
            drop = round(self.options.ratio * width)
            if drop >= width:
                raise PipelineError(f"prune-ffn: ratio {self.options.ratio} removes all {width} neurons of "
                                    f"{mlp.module}; use a smaller ratio")
            scores = neuron_scores(gm, mlp, self.options.score, generator)
            keep = scores.topk(width - drop).indices.sort().values
            removed += prune_mlp(gm, mlp, keep)
            previous = kept.get(mlp.module)
            kept[mlp.module] = [previous[i] for i in keep.tolist()] if previous else keep.tolist()
            rewrite_widths(gm, mlp, width, width - drop)
            neurons += drop
        ir.set_plan(gm, dataclasses.replace(record, neurons=tuple(ir.Kept(m, tuple(ix)) for m, ix in kept.items())))
        gm.meta.pop(CACHE_KEY, None)  # widths changed
        propagate_shapes(gm)
        gm.graph.lint()
        gm.recompile()
        log.info("prune-ffn: %d neurons, %d parameters removed", neurons, removed)
        return PassResult(gm, neurons > 0, {"neurons-removed": neurons, "params-removed": removed})
