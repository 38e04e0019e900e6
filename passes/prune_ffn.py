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
from bmc.rewrite.linear import all_projections
from bmc.rewrite.params import slice_parameter
from bmc.passmgr.equivalence import changes
from bmc.passmgr.manager import Pass, PassResult, register_pass
from bmc.analysis.structure import CACHE_KEY, MLP, Linear, structure_of

log = logging.getLogger(__name__)
aten = torch.ops.aten


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


def _parts(mlp: MLP) -> int:
    """How many neuron-wide parts up's output holds: 2 for a fused gate|up (Phi-3's gate_up_proj,
    neuron j at feature j of each part), else 1."""
    return len(mlp.up_parts) if mlp.up_parts else 1


def _width(mlp: MLP) -> int:
    return mlp.down.in_features


def neuron_scores(gm: fx.GraphModule, mlp: MLP, score: str, generator: torch.Generator) -> torch.Tensor:
    width = _width(mlp)
    if score == "random":
        return torch.rand(width, generator=generator)
    up = _rows(gm, mlp.up).float().reshape(_parts(mlp), width, -1).norm(dim=2).prod(dim=0)  # gate and up of a fused one
    value = up * _rows(gm, mlp.down).float().norm(dim=0)
    if mlp.gate is not None:
        value = value * _rows(gm, mlp.gate).float().norm(dim=1)
    return value


def prune_mlp(gm: fx.GraphModule, mlp: MLP, keep: torch.Tensor) -> int:
    """Keep neurons `keep` (sorted): rows of up/gate (and their biases; in each part of a fused
    gate|up), columns of down."""
    removed = 0
    for lin in (p for p in (mlp.up, mlp.gate) if p is not None):
        parts = _parts(mlp) if lin is mlp.up else 1
        rows = torch.cat([keep + part * _width(mlp) for part in range(parts)])
        removed += slice_parameter(gm, lin.weight, rows, 1 if lin.transposed else 0)
        if lin.bias is not None:
            removed += slice_parameter(gm, lin.bias, rows, 0)
    removed += slice_parameter(gm, mlp.down.weight, keep, 0 if mlp.down.transposed else 1)
    return removed


def _check_widths(mlp: MLP) -> None:
    """up (each part of a fused gate|up) and gate are as wide as down's input, or which output
    feature is which neuron is not proven."""
    widths = [mlp.up.out_features // _parts(mlp)] + ([mlp.gate.out_features] if mlp.gate is not None else [])
    if mlp.up.out_features % _parts(mlp) or any(w != _width(mlp) for w in widths):
        raise PipelineError(f"prune-ffn: {mlp.module}'s up/gate give {mlp.up.out_features} features for the "
                            f"{_width(mlp)} inputs of {mlp.down.weight}, in parts the graph does not show; "
                            f"its neurons cannot be told apart (leave this model out of prune-ffn)")


def rewrite_fused_cut(gm: fx.GraphModule, mlp: MLP, new: int) -> None:
    """A fused gate|up is cut into its neuron-wide parts by chunk (nothing baked), by split
    (the width baked) or by slices at multiples of the width on the last dim (rewritten to the
    new width); anything else is refused."""
    width = _width(mlp)
    nodes = [p.node for p in all_projections(gm) if str(p.weight.target) == mlp.up.weight]
    if mlp.up_parts != (width,) * _parts(mlp) or not nodes:
        raise PipelineError(f"prune-ffn: the fused {mlp.up.weight} is cut into {list(mlp.up_parts)}, not equal parts "
                            f"of the {width} neurons; its neurons cannot be told apart")
    for node in nodes:
        cuts = list(node.users)
        if not cuts or not all(_rewrite_cut(cut, width, new, _parts(mlp)) for cut in cuts):
            raise PipelineError(f"prune-ffn: the fused {mlp.up.weight} is taken apart by "
                                f"{', '.join(str(c.target) for c in cuts)} in a way not followed (chunk, split, or "
                                f"slices of the last dim at multiples of the {width} neurons are)")


def _slice_args(node: fx.Node) -> tuple:
    """(x, dim, start, end, step) of an aten.slice.Tensor, defaults filled in."""
    defaults = (None, 0, None, None, 1)
    return tuple(node.args) + defaults[len(node.args):]


def _rewrite_cut(cut: fx.Node, width: int, new: int, parts: int) -> bool:
    """Give one cut of a fused gate|up the new width; False if it is not a cut into whole parts."""
    if cut.target is aten.chunk.default:
        return len(cut.users) == parts and cut.args[1] == parts
    if cut.target is aten.split.Tensor:
        if cut.args[1] != width:
            return False
        cut.args = (cut.args[0], new, *cut.args[2:])
        return True
    if cut.target is aten.split_with_sizes.default:
        if list(cut.args[1]) != [width] * parts:
            return False
        cut.args = (cut.args[0], [new] * parts, *cut.args[2:])
        return True
    if cut.target is aten.slice.Tensor:
        x, dim, start, end, step = _slice_args(cut)
        rank = len(ir.tensor_val(x).shape)
        start, end = start or 0, parts * width if end is None or end >= parts * width else end
        if dim % rank != rank - 1 or step != 1 or start % width or end % width or end <= start:
            return False
        cut.args = (x, dim, start // width * new, end // width * new, step)
        return True
    return False


VIEWS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default)


def rewrite_widths(gm: fx.GraphModule, mlp: MLP, old: int, new: int) -> int:
    """Views inside the MLP that bake its width (HF's Conv1D views x as [..., width]) take the
    new one. The hidden size never equals the width here (checked), so no other dim is hit."""
    widths = {old * k: new * k for k in range(1, _parts(mlp) + 1)}  # a fused gate|up's output: parts * width
    if mlp.up.in_features in widths:
        raise PipelineError(f"prune-ffn: {mlp.module} is as wide as its input ({mlp.up.in_features}), so the views "
                            f"that bake its width cannot be told from the others")
    changed = 0
    for node in gm.graph.nodes:
        if node.target in VIEWS and (ir.module_path(node) + ".").startswith(mlp.module + "."):
            shape = list(node.args[1])
            if any(d in widths for d in shape):
                node.args = (node.args[0], [widths.get(d, d) for d in shape], *node.args[2:])
                changed += 1
    return changed


@register_pass("prune-ffn", options=PruneFfnOptions, invalidates=("cost",),
               forbids=("staged", "fused-regions", "quantized"), equivalence=changes("MLP neurons removed"))
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
            width = _width(mlp)
            _check_widths(mlp)
            drop = round(self.options.ratio * width)
            if drop >= width:
                raise PipelineError(f"prune-ffn: ratio {self.options.ratio} removes all {width} neurons of "
                                    f"{mlp.module}; use a smaller ratio")
            scores = neuron_scores(gm, mlp, self.options.score, generator)
            keep = scores.topk(width - drop).indices.sort().values
            if mlp.up_parts:
                rewrite_fused_cut(gm, mlp, width - drop)
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
