"""insert-remat: recompute activations in backward instead of saving them (activation
checkpointing), on the graph: a region becomes a submodule called through
torch.utils.checkpoint, so only the region's inputs are saved.

Policies:
- block: every repeated block is one region.
- selective: Megatron's selective activation recompute (Korthikanti et al. 2022): in each
  block only the attention core, from the q/k/v projections' outputs through the attention
  op to the input of the output projection, is recomputed. It drops what the core saves
  beyond its inputs and output, for few FLOPs (no weight matmul): with attention written
  out, the [B, heads, S, S] probabilities (and dropout mask); with a fused sdpa kernel,
  which never saves those, only its log-sum-exp and the RoPE / repeat_kv copies.
- budget: the fewest whole blocks, best bytes saved per recomputed FLOP first, such that
  the cost model's saved-activation bytes, at the batch and sequence sizes of the traced
  example inputs, fit `budget`.

Regions are fused and priced by bmc/rewrite/regions.py, shared with insert-offload.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import sympy
import torch
from torch import fx
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

from bmc import ir
from bmc.analysis import cost
from bmc.errors import PipelineError
from bmc.analysis.graph_patterns import _ATTENTION_OPS, _op
from bmc.passmgr.manager import Pass, PassResult, register_pass, register_preset
from bmc.analysis.structure import Attention, Linear, _Graph, structure_of
from bmc.rewrite.regions import (Ledger, Nodes, wrap_region, fuse_regions, ledger,
                                 repeated_blocks, trace_substitutions)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RematOptions:
    # block: checkpoint every repeated block; selective: only each block's attention core;
    # budget: the fewest blocks that make the predicted saved activations fit `budget`.
    policy: Literal["block", "selective", "budget"] = "block"
    # bytes of saved activations allowed (cost model, at the traced batch and sequence);
    # giving it selects policy=budget
    budget: int | None = None

    def __post_init__(self):
        if self.budget is not None:
            if self.budget <= 0:
                raise ValueError(f"budget must be > 0 bytes, got {self.budget}")
            if self.policy == "selective":
                raise ValueError("budget applies to policy=budget, not policy=selective: drop one of them")
            # `insert-remat{budget=N}` reads as the budget policy; the default policy gives way
            object.__setattr__(self, "policy", "budget")
        # policy=budget without a budget still parses (the pass manager round-trips every
        # option spelled out alone); InsertRemat.check refuses it before anything runs


# ------------------------------------------------------------------ selective: the attention core

def _projection_nodes(gm: fx.GraphModule) -> dict[fx.Node, Linear]:
    """Every projection node of the graph and its Linear, matched as the structure analysis
    matches them (linear, addmm, mm + bias; weights stored either way round)."""
    return _Graph(gm).linears


def attention_core(gm: fx.GraphModule, attention: Attention, linears: dict[fx.Node, Linear]) -> Nodes:
    """The nodes on every path from the q/k/v (or fused qkv) projections' outputs to the output
    projection's input, both projections excluded: head splits, RoPE, repeat_kv, the
    attention op (sdpa, or matmul/softmax/matmul) and the merge of heads. Empty if the
    projections are not found or no attention op lies between them."""
    wanted = {p for p in (attention.q, attention.k, attention.v, attention.qkv) if p is not None}
    starts = {n for n, lin in linears.items() if lin in wanted}
    ends = [n for n, lin in linears.items() if lin == attention.o]
    if not starts or len(ends) != 1:
        return {}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    first = min(order[s] for s in starts)
    o_input = next(a for a in ends[0].args if isinstance(a, fx.Node) and a.op != "get_attr")
    # ancestors of the o projection's input that lie after the first projection ...
    back: set[fx.Node] = set()
    stack = [o_input]
    while stack:
        node = stack.pop()
        if node in back or node in starts or node.op != "call_function" or order[node] < first:
            continue
        back.add(node)
        stack.extend(node.all_input_nodes)
    # ... that are also descendants of a q/k/v projection: the paths between them
    core: set[fx.Node] = set()
    stack = [u for s in starts for u in s.users]
    while stack:
        node = stack.pop()
        if node in back and node not in core:
            core.add(node)
            stack.extend(node.users)
    if not any(_op(n) in _ATTENTION_OPS for n in core):
        return {}
    return {n: None for n in gm.graph.nodes if n in core}


def attention_cores(gm: fx.GraphModule) -> list[tuple[str, Nodes]]:
    """(attention module, its core nodes) for every block whose attention the analysis found."""
    linears = _projection_nodes(gm)
    found = []
    for block in structure_of(gm).blocks:
        if block.attention is None:
            continue
        core = attention_core(gm, block.attention, linears)
        if core:
            found.append((block.attention.module, core))
    if not found:
        raise PipelineError("insert-remat{policy=selective} found no attention core (q/k/v projections -> "
                            "attention -> output projection) in the blocks; use insert-remat{policy=block}")
    return found


# ------------------------------------------------------------------ budget

def choose_blocks(book: Ledger, budget: int) -> list[str]:
    """The blocks to checkpoint, in program order: the ones that remove the most saved bytes
    per FLOP they recompute first (the earlier block on a tie), until the prediction fits."""
    least = book.total(checkpointed=book.plain)
    if least > budget:
        raise PipelineError(f"insert-remat{{budget={budget}}}: even with all {len(book.plain)} blocks checkpointed "
                            f"{int(least)} bytes of activations stay saved; raise the budget to at least "
                            f"{int(least)}, lower the batch or sequence, or add insert-offload")
    full = book.total()
    per_flop = {name: (full - book.total(checkpointed=[name])) / max(book.flops[name], 1.0) for name in book.plain}
    chosen: list[str] = []
    for name in sorted(book.plain, key=lambda n: -per_flop[n]):  # a stable sort: ties keep program order
        if book.total(checkpointed=chosen) <= budget:
            break
        chosen.append(name)
    return [name for name in book.plain if name in chosen]


# ------------------------------------------------------------------ the pass

def _checkpoint(gm: fx.GraphModule, fused: fx.Node, policy: str, region: str) -> fx.Node:
    return wrap_region(gm, fused, ir.Region("checkpoint", "insert-remat", policy, region))


def _saved_bytes(gm: fx.GraphModule, subs: dict) -> int | None:
    """The cost model's saved-activation bytes at the traced sizes (None if it cannot say)."""
    try:
        return int(cost.evaluate(cost.activation_bytes(gm), subs))
    except ValueError:
        return None


# a second fusing pass would see a block split around the first one's call
FUSE_ONCE = "keep one of insert-remat / insert-offload{what=activations} in the pipeline"


@register_pass("insert-remat", options=RematOptions, provides=("fused-regions",), invalidates=("cost",),
               forbids=("staged", ("fused-regions", FUSE_ONCE)))
class InsertRemat(Pass):
    """Recompute activations in backward: checkpoint blocks, attention cores, or blocks to a byte budget."""

    def check(self) -> None:
        if self.options.policy == "budget" and self.options.budget is None:
            raise PipelineError("insert-remat{policy=budget} needs budget=BYTES, e.g. insert-remat{budget=200000000}")

    def _regions(self, gm: fx.GraphModule, subs: dict) -> list[tuple[str, Nodes]]:
        """(region name, nodes) of what the policy recomputes."""
        if self.options.policy == "selective":
            return attention_cores(gm)
        blocks = repeated_blocks(gm, "insert-remat")
        if self.options.policy == "block":
            return blocks
        chosen = choose_blocks(ledger(gm, blocks, subs), self.options.budget)
        return [(name, nodes) for name, nodes in blocks if name in chosen]

    def run(self, gm: fx.GraphModule) -> PassResult:
        self.check()
        policy = self.options.policy
        subs = trace_substitutions(gm)
        before = _saved_bytes(gm, subs)
        regions = self._regions(gm, subs)
        if regions:
            gm, calls = fuse_regions(gm, [nodes for _, nodes in regions], prefix=f"remat_{policy}_")
            for (name, _), fused in zip(regions, calls):
                _checkpoint(gm, fused, policy, name)
            gm.graph.lint()
            gm.recompile()
        after = _saved_bytes(gm, subs)
        key = "attention-cores-checkpointed" if policy == "selective" else "blocks-checkpointed"
        stats = {key: len(regions)}
        if before is not None and after is not None:
            stats.update({"saved-bytes-before": before, "saved-bytes-after": after})
        log.info("insert-remat{policy=%s}: %d regions checkpointed; predicted saved bytes %s -> %s",
                 policy, len(regions), before, after)
        return PassResult(gm, bool(regions), stats)


register_preset("ckpt", "insert-remat{policy=block}", "checkpoint every repeated block (recompute in backward)")
