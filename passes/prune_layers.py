"""prune-layers: remove whole residual blocks (their nodes and their parameters).

A residual block maps its input stream x to x + f(x) (pre-norm) or norm(x + f(x)) (post-norm);
pruning it makes the stream flow past it unchanged, so the pruned model equals the original
with that block replaced by the identity. `drop=[i,...]` names blocks by index; otherwise `ratio=R` (default 0.2)
drops round(R * blocks) of them by `policy`: `every-other` takes every second block from the
second-to-last down, then the ones between, from the top (the first and last blocks, which
matter most, are the last to go); `score` runs the calibration batches and drops the blocks
that change the stream least: Block Influence, 1 - mean cosine(stream in, stream out) per
token (Men et al. 2024, "ShortGPT").
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.fx as fx

from bmc import ir
from bmc.errors import PipelineError
from bmc.passmgr.equivalence import changes
from bmc.passmgr.manager import Pass, PassResult, register_pass
from bmc.passmgr.properties import Properties
from bmc.analysis.structure import CACHE_KEY, Block, structure_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneLayersOptions:
    drop: Optional[tuple[int, ...]] = None  # block indices; when given, ratio is not used
    ratio: float = 0.2
    policy: Literal["every-other", "score"] = "every-other"

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.policy not in ("every-other", "score"):
            raise ValueError(f"policy must be every-other or score, got {self.policy!r}")


def every_other(count: int, k: int) -> list[int]:
    """k block indices, every second one from the second-to-last down, then the rest between."""
    order = list(range(count - 2, 0, -2)) + list(range(count - 3, 0, -2)) + [count - 1, 0]
    return sorted(order[:k])


class _StreamProbe(fx.Interpreter):
    """Runs the graph and keeps the per-token cosine between each block's stream in and out."""

    def __init__(self, gm: fx.GraphModule, ends: dict[fx.Node, tuple[int, fx.Node]], totals: list[float]):
        super().__init__(gm)
        self.ends, self.totals, self.tokens = ends, totals, 0
        self.streams = {stream: None for _, stream in ends.values()}  # held here: the interpreter frees
        # a value after its last reader, which may come before the block's output

    def run_node(self, node: fx.Node):
        result = super().run_node(node)
        if node in self.streams:
            self.streams[node] = result
        if node in self.ends:
            position, stream = self.ends[node]
            cos = torch.nn.functional.cosine_similarity(result.float(), self.streams[stream].float(), dim=-1)
            self.totals[position] += float(cos.sum())
            if position == 0:
                self.tokens += cos.numel()
        return result


def block_influence(gm: fx.GraphModule, blocks: tuple[Block, ...], data) -> list[float]:
    """1 - mean cosine(stream in, stream out) of each block over the calibration tokens."""
    from bmc.compress import calibration
    batches = calibration.batches(gm, data, "prune-layers{policy=score}")
    ends = {}
    for position, block in enumerate(blocks):
        _, out, stream = _stream_ends(gm, block)
        ends[out] = (position, stream)
    totals, tokens = [0.0] * len(blocks), 0
    with torch.no_grad():
        for args, kwargs in batches:
            probe = _StreamProbe(gm, ends, totals)
            calibration.interpret(gm, probe, args, kwargs)
            tokens += probe.tokens
    return [1 - t / tokens for t in totals]


def _by_score(gm: fx.GraphModule, blocks: tuple[Block, ...], k: int, data) -> list[int]:
    influence = block_influence(gm, blocks, data)
    log.info("prune-layers: block influence %s", {b.index: round(v, 5) for b, v in zip(blocks, influence)})
    order = sorted(range(len(blocks)), key=lambda i: influence[i])
    return sorted(blocks[i].index for i in order[:k])


def _chosen(gm: fx.GraphModule, blocks: tuple[Block, ...], opts: PruneLayersOptions, data) -> list[Block]:
    by_index = {b.index: b for b in blocks}
    if opts.drop is not None:
        missing = sorted(set(opts.drop) - set(by_index))
        if missing:
            raise PipelineError(f"prune-layers: no block with index {missing} (the model's blocks are "
                                f"{sorted(by_index)}); name existing blocks")
        indices = sorted(set(opts.drop))
    elif opts.policy == "score":
        indices = _by_score(gm, blocks, round(opts.ratio * len(blocks)), data)
    else:
        indices = [sorted(by_index)[i] for i in every_other(len(blocks), round(opts.ratio * len(blocks)))]
    if len(indices) >= len(blocks):
        raise PipelineError(f"prune-layers would remove all {len(blocks)} blocks; keep at least one")
    return [by_index[i] for i in indices]


def _within(path: str, block: str) -> bool:
    return path == block or path.startswith(block + ".")


def _stream_ends(gm: fx.GraphModule, block: Block) -> tuple[list[fx.Node], fx.Node, fx.Node]:
    """The block's nodes, the one value it hands on, and the residual stream entering it."""
    inside = [n for n in gm.graph.nodes if n.op == "call_function" and _within(ir.module_path(n), block.name)]
    members = set(inside)
    outputs = [n for n in inside if any(u not in members for u in n.users)]
    if len(outputs) != 1:
        raise PipelineError(f"prune-layers: block {block.name} hands {len(outputs)} values to the rest of the "
                            f"graph, not one residual stream; it cannot be removed")
    out = ir.tensor_val(outputs[0])
    entering = {a for n in inside for a in n.all_input_nodes if a not in members and a.op != "get_attr"}
    stream = [a for a in entering if (v := ir.tensor_val(a)) is not None and v.shape == out.shape and v.dtype == out.dtype]
    if len(stream) != 1:
        raise PipelineError(f"prune-layers: cannot tell which input of block {block.name} is its residual stream "
                            f"({len(stream)} candidates of its output's shape)")
    return inside, outputs[0], stream[0]


def _bypass(gm: fx.GraphModule, block: Block) -> None:
    """Route the block's result readers to its input stream."""
    inside, out, stream = _stream_ends(gm, block)
    out.replace_all_uses_with(stream)
    # erased outright: fx's dead-code elimination keeps random ops (dropout) as impure
    for node in reversed(inside):
        node.graph.erase_node(node)
    for node in list(gm.graph.find_nodes(op="get_attr")):
        if not node.users and _within(str(node.target).rpartition(".")[0], block.name):
            gm.graph.erase_node(node)


def _drop_parameters(gm: fx.GraphModule, block: Block) -> int:
    """Remove the block's submodule; its parameter count."""
    module = gm.get_submodule(block.name)
    count = sum(p.numel() for p in module.parameters())
    parent, _, leaf = block.name.rpartition(".")
    # Module.__delattr__, not ModuleList.__delitem__: the blocks after keep their indices and names
    delattr(gm.get_submodule(parent) if parent else gm, leaf)
    return count


@register_pass("prune-layers", options=PruneLayersOptions, invalidates=("cost",),
               forbids=("staged", "fused-regions", "quantized"), equivalence=changes("blocks removed"))
class PruneLayers(Pass):
    """Remove whole residual blocks: by index, or a ratio of them by policy."""

    def properties(self) -> Properties:
        needs = ("calibration",) if self.options.policy == "score" and self.options.drop is None else ()
        return dataclasses.replace(super().properties(), requires=needs)

    def run(self, gm: fx.GraphModule) -> PassResult:
        blocks = structure_of(gm).blocks
        if not blocks:
            raise PipelineError("prune-layers: the structure analysis found no residual blocks in this model")
        chosen = _chosen(gm, blocks, self.options, self.context.calibration)
        for block in chosen:
            _bypass(gm, block)
        gm.graph.eliminate_dead_code()
        removed = sum(_drop_parameters(gm, block) for block in chosen)
        record = ir.get_plan(gm, ir.PrunePlan) or ir.PrunePlan()
        ir.set_plan(gm, dataclasses.replace(record, layers_dropped=record.layers_dropped + tuple(b.name for b in chosen)))
        gm.meta.pop(CACHE_KEY, None)  # the structure changed
        gm.graph.lint()
        gm.recompile()
        log.info("prune-layers: dropped %s (%d parameters)", [b.name for b in chosen], removed)
        return PassResult(gm, bool(chosen), {"blocks-dropped": len(chosen), "params-removed": removed})
