"""quant-int8: linear weights to int8 with one fp32 scale per output row (symmetric absmax).

Each `aten.linear` whose module is not skipped becomes a `bmc::int8_linear` reading an int8
weight buffer and a scale buffer; the fp32 weight is removed from the module, so parameter
counts and bytes drop. `granularity=tensor` (one scale for the whole matrix) exists to show
the difference, not as a default. `act=dynamic` also quantizes activations per token at run
time (W8A8); `act=none` is weight-only (dequantized on the fly). `skip` takes fnmatch
patterns on module paths; by default the output head is skipped (its outliers cost the most
accuracy) and so is any weight tied to an embedding (the lookup needs the fp32 rows).
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.fx as fx

import bmc.ir.ops  # noqa: F401 - registers bmc::int8_linear
from bmc import ir
from bmc.errors import PipelineError
from bmc.passmgr.manager import Pass, PassResult, register_pass
from bmc.analysis.structure import structure_of

log = logging.getLogger(__name__)
aten = torch.ops.aten
INT8_LINEAR = torch.ops.bmc.int8_linear.default


@dataclass(frozen=True)
class QuantOptions:
    granularity: Literal["row", "tensor"] = "row"
    act: Literal["none", "dynamic"] = "none"
    skip: Optional[tuple[str, ...]] = None  # module-path patterns; None: the output head
    # a weight tied to an embedding: skip it, or quantize a copy for the projection (the lookup
    # keeps the fp32 table; +1 byte a weight, for serving builds that quantize the head too)
    tied: Literal["skip", "copy"] = "skip"

    def __post_init__(self):
        if self.granularity not in ("row", "tensor"):
            raise ValueError(f"granularity must be row or tensor, got {self.granularity!r}")
        if self.act not in ("none", "dynamic"):
            raise ValueError(f"act must be none or dynamic, got {self.act!r}")
        if self.tied not in ("skip", "copy"):
            raise ValueError(f"tied must be skip or copy, got {self.tied!r}")


def quantize(weight: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, fp32 scales): scale = absmax / 127 per row (or over the tensor), clamped
    away from zero so an all-zero row stays zero."""
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1) if granularity == "row" else w.abs().amax().reshape(1)
    scale = absmax.clamp(min=1e-8) / 127.0
    q = (w / scale.reshape(-1, 1)).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def _skipped(gm: fx.GraphModule, patterns: tuple[str, ...] | None) -> tuple[tuple[str, ...], set[str]]:
    """The patterns in force, and the weights that stay fp32 whatever the patterns (tied to
    an embedding)."""
    structure = structure_of(gm)
    if patterns is None:
        patterns = (structure.head.module,) if structure.head is not None else ()
    embedded = {name for e in structure.embeddings for name in (structure.tied_group(e.weight) or (e.weight,))}
    return patterns, embedded


def _owner(gm: fx.GraphModule, dotted: str) -> tuple[torch.nn.Module, str]:
    owner, _, leaf = dotted.rpartition(".")
    return (gm.get_submodule(owner) if owner else gm), leaf


def _replace_weight(gm: fx.GraphModule, node: fx.Node, weight_node: fx.Node, granularity: str,
                    keep_fp32: bool = False) -> tuple[fx.Node, fx.Node, int]:
    """Swap the fp32 weight for int8 + scale buffers on its module (beside it, when it is kept
    for another reader); the get_attr nodes for them."""
    name = str(weight_node.target)
    q, scale = quantize(gm.get_parameter(name), granularity)
    owner, leaf = _owner(gm, name)
    fp32_bytes = q.numel() * 4
    if not keep_fp32:
        delattr(owner, leaf)
    owner.register_buffer(f"{leaf}_int8", q)
    owner.register_buffer(f"{leaf}_scale", scale)
    with gm.graph.inserting_before(node):
        q_node = gm.graph.get_attr(f"{name}_int8")
        s_node = gm.graph.get_attr(f"{name}_scale")
    for new, value in ((q_node, q), (s_node, scale)):
        new.meta["val"] = torch.empty(value.shape, dtype=value.dtype, device="meta")
    return q_node, s_node, fp32_bytes


@register_pass("quant-int8", options=QuantOptions, provides=("quantized",), invalidates=("cost",),
               forbids=("staged", "fused-regions"))
class QuantInt8(Pass):
    """Linear weights to int8 with per-row fp32 scales, run by bmc::int8_linear."""

    def run(self, gm: fx.GraphModule) -> PassResult:
        opts = self.options
        linears = [n for n in gm.graph.find_nodes(op="call_function", target=aten.linear.default)
                   if n.args[1].op == "get_attr"]
        if not linears:
            raise PipelineError("quant-int8: the graph has no linear layers with weights (aten.linear) to quantize")
        patterns, embedded = _skipped(gm, opts.skip)
        stats = {"quantized": 0, "skipped": 0, "fp32-bytes": 0, "int8-bytes": 0}
        for node in linears:
            weight_node = node.args[1]
            name, path = str(weight_node.target), ir.module_path(node)
            shared = name in embedded or len(weight_node.users) > 1
            if any(fnmatch.fnmatch(path, p) for p in patterns) or (shared and opts.tied == "skip"):
                stats["skipped"] += 1
                continue
            q_node, s_node, fp32_bytes = _replace_weight(gm, node, weight_node, opts.granularity, keep_fp32=shared)
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            node.target, node.args, node.kwargs = INT8_LINEAR, (node.args[0], q_node, s_node, bias, opts.act), {}
            ir.annotate(node, ir.Quant("int8", opts.granularity, opts.act))
            if not weight_node.users:
                gm.graph.erase_node(weight_node)
            stats["quantized"] += 1
            stats["fp32-bytes"] += fp32_bytes
            stats["int8-bytes"] += ir.tensor_val(q_node).numel() + ir.tensor_val(s_node).numel() * 4
        if not stats["quantized"]:
            raise PipelineError(f"quant-int8: every linear layer is skipped (patterns {list(patterns)}); "
                                f"narrow skip=[...]")
        gm.graph.lint()
        gm.recompile()
        log.info("quant-int8: %s", stats)
        return PassResult(gm, True, stats)
