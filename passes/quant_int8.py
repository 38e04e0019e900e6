"""quant-int8: projection weights to int8 with one fp32 scale per output row (symmetric absmax).

Each projection whose module is not skipped becomes a `bmc::int8_linear` reading an int8
weight buffer, stored (out, in), and a scale buffer. Every form the structure analysis knows is
rewritten alike: `aten.linear`, Hugging Face's Conv1D `addmm` (its (in, out) weight is
transposed when quantized) and a matmul by a weight (x @ W.t(), or x @ W stored (in, out)).
The fp32 weight is removed from the module, so parameter counts and bytes drop.
`granularity=tensor` (one scale for the whole matrix) exists to show the difference, not as a
default. `act=dynamic` also quantizes activations per token at run
time (W8A8); `act=none` is weight-only (dequantized on the fly). `skip` takes fnmatch
patterns on module paths; by default the output head is skipped (its outliers cost the most
accuracy) and so is any weight tied to an embedding (the lookup needs the fp32 rows).
"""
from __future__ import annotations

import fnmatch
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.fx as fx

import bmc.ir.ops  # noqa: F401 - registers bmc::int8_linear
from bmc import ir
from bmc.errors import PipelineError
from bmc.passmgr.equivalence import bounded
from bmc.passmgr.manager import Pass, PassResult, register_pass
from bmc.analysis.structure import structure_of
from bmc.rewrite.linear import Projection, all_projections, read_elsewhere

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


def _skipped(gm: fx.GraphModule, patterns: tuple[str, ...] | None) -> tuple[tuple[str, ...], set[str], set[str]]:
    """The patterns in force, the weights they leave fp32 by default (the output head's: named
    by weight, since a head written as a matmul in the model's own forward has no module of its
    own), and the weights that stay fp32 whatever the patterns (tied to an embedding)."""
    structure = structure_of(gm)
    head: set[str] = set()
    if patterns is None and structure.head is not None:
        patterns = (structure.head.module,)
        head = {structure.head.weight, *(structure.tied_group(structure.head.weight) or ())}
    embedded = {name for e in structure.embeddings for name in (structure.tied_group(e.weight) or (e.weight,))}
    return patterns or (), head, embedded


def _owner(gm: fx.GraphModule, dotted: str) -> tuple[torch.nn.Module, str]:
    owner, _, leaf = dotted.rpartition(".")
    return (gm.get_submodule(owner) if owner else gm), leaf


def _by_weight(gm: fx.GraphModule) -> dict[fx.Node, list[Projection]]:
    """Every projection (linear, Conv1D addmm, matmul by a weight), grouped by its weight."""
    groups: dict[fx.Node, list[Projection]] = {}
    for proj in all_projections(gm):
        groups.setdefault(proj.weight, []).append(proj)
    return groups


def _matches(projs: list[Projection], patterns: tuple[str, ...]) -> bool:
    """A skip pattern names the module running the projection, or the one owning its weight
    (they differ for a matmul written in the parent's forward)."""
    paths = {ir.module_path(p.node) for p in projs} | {str(projs[0].weight.target).rpartition(".")[0]}
    return any(fnmatch.fnmatch(path, pattern) for path in paths for pattern in patterns)


def _skip_reason(name: str, projs: list[Projection], opts: QuantOptions, patterns: tuple[str, ...],
                 head: set[str], shared: bool) -> str | None:
    if (name in head) if opts.skip is None else _matches(projs, patterns):
        return "pattern"
    return "shared" if shared and opts.tied == "skip" else None


def _replace_weight(gm: fx.GraphModule, before: fx.Node, weight_node: fx.Node, in_out: bool, granularity: str,
                    keep_fp32: bool = False) -> tuple[fx.Node, fx.Node, int]:
    """Swap the fp32 weight for int8 + scale buffers on its module (beside it, when it is kept
    for another reader); the get_attr nodes for them. The int8 weight is stored (out, in), one
    scale per output row, whichever way the fp32 one was (a Conv1D's (in, out) is transposed)."""
    name = str(weight_node.target)
    weight = gm.get_parameter(name)
    q, scale = quantize(weight.t() if in_out else weight, granularity)
    owner, leaf = _owner(gm, name)
    fp32_bytes = q.numel() * 4
    if not keep_fp32:
        delattr(owner, leaf)
    owner.register_buffer(f"{leaf}_int8", q)
    owner.register_buffer(f"{leaf}_scale", scale)
    with gm.graph.inserting_before(before):
        q_node = gm.graph.get_attr(f"{name}_int8")
        s_node = gm.graph.get_attr(f"{name}_scale")
    for new, value in ((q_node, q), (s_node, scale)):
        new.meta["val"] = torch.empty(value.shape, dtype=value.dtype, device="meta")
    return q_node, s_node, fp32_bytes


def _rewrite(gm: fx.GraphModule, proj: Projection, q_node: fx.Node, s_node: fx.Node, opts: QuantOptions) -> None:
    """The projection becomes int8_linear(x, W_q, scale, bias); its output shape is unchanged
    (an addmm's 2-D x gives the same 2-D result), and a bias added after a matmul stays where it is."""
    node = proj.node
    node.target, node.args, node.kwargs = INT8_LINEAR, (proj.x, q_node, s_node, proj.bias, opts.act), {}
    ir.annotate(node, ir.Quant("int8", opts.granularity, opts.act))
    if proj.transpose is not None and not proj.transpose.users:
        gm.graph.erase_node(proj.transpose)


def _nothing_quantized(found: Counter, skipped: dict[str, list[str]], patterns: tuple[str, ...]) -> str:
    """What the pass found and why each was left fp32, for the error when nothing was quantized."""
    forms = ", ".join(f"{count} {FORM_NAMES[form]}" for form, count in found.items())
    reasons = []
    if skipped["pattern"]:
        names = ", ".join(skipped["pattern"][:3]) + (", ..." if len(skipped["pattern"]) > 3 else "")
        reasons.append(f"{len(skipped['pattern'])} by skip patterns {list(patterns)} ({names})")
    if skipped["shared"]:
        reasons.append(f"{len(skipped['shared'])} because the weight is also read elsewhere, e.g. tied to an "
                       f"embedding ({', '.join(skipped['shared'][:3])}; tied=copy quantizes a copy)")
    return (f"quant-int8: nothing to quantize: found {forms}, all left fp32: {'; '.join(reasons)}; "
            f"narrow skip=[...] to quantize some")


FORM_NAMES = {"linear": "aten.linear", "addmm": "Conv1D addmm", "matmul": "matmul by a weight"}


# bmc.check on zoo llama-tiny, gpt-tiny and HF LLaMA/GPT-2 measured (outputs; gradients, relative
# to their largest magnitude) <= 8.3e-3; 1.26e-2: the bound is three times the worst
@register_pass("quant-int8", options=QuantOptions, provides=("quantized",), invalidates=("cost",),
               forbids=("staged", "fused-regions"),
               equivalence=bounded(4e-2, "int8 weights, per-row scales (rounding <= half a step a weight)"))
class QuantInt8(Pass):
    """Projection weights to int8 with per-row fp32 scales, run by bmc::int8_linear."""

    def run(self, gm: fx.GraphModule) -> PassResult:
        opts = self.options
        groups = _by_weight(gm)
        if not groups:
            raise PipelineError("quant-int8: the graph has no projections by a weight parameter to quantize "
                                "(aten.linear, Conv1D addmm, or matmul by a weight)")
        patterns, head, embedded = _skipped(gm, opts.skip)
        found = Counter(p.form for projs in groups.values() for p in projs)
        skipped: dict[str, list[str]] = {"pattern": [], "shared": []}
        stats = {"quantized": 0, "skipped": 0, "fp32-bytes": 0, "int8-bytes": 0}
        for weight_node, projs in groups.items():
            name = str(weight_node.target)
            shared = name in embedded or read_elsewhere(weight_node, projs)
            reason = _skip_reason(name, projs, opts, patterns, head, shared)
            if reason is not None:
                skipped[reason].append(name)
                stats["skipped"] += len(projs)
                continue
            q_node, s_node, fp32_bytes = _replace_weight(gm, projs[0].node, weight_node, projs[0].in_out,
                                                         opts.granularity, keep_fp32=shared)
            for proj in projs:
                _rewrite(gm, proj, q_node, s_node, opts)
            if not weight_node.users:
                gm.graph.erase_node(weight_node)
            stats["quantized"] += len(projs)
            stats["fp32-bytes"] += fp32_bytes
            stats["int8-bytes"] += ir.tensor_val(q_node).numel() + ir.tensor_val(s_node).numel() * 4
        if not stats["quantized"]:
            raise PipelineError(_nothing_quantized(found, skipped, patterns))
        gm.graph.lint()
        gm.recompile()
        log.info("quant-int8: %s (found %s)", stats, dict(found))
        return PassResult(gm, True, stats)
