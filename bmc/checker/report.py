"""How far the transformed values are from the original's, the verdict against the pipeline's
contract, and where the first wrong value appears (forward) or the first wrong gradient flows
(backward), with the pass that made that node."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.fx as fx

from bmc import ir
from bmc.checker.values import Run, tp_placement
from bmc.passmgr.equivalence import Equivalence
from bmc.passmgr.manager import TOUCHED_KEY

# A value whose largest magnitude is below this is measured against it, not against itself:
# fp32 noise on an all-but-zero tensor is not a relative error of 100%.
SCALE_FLOOR = 1e-3


@dataclass(frozen=True)
class Error:
    abs: float
    rel: float  # abs / the reference's largest magnitude

    def __str__(self):
        return f"max abs {self.abs:.1e}, rel {self.rel:.1e}"


def error(ref: torch.Tensor, got: torch.Tensor) -> Error | None:
    """The largest difference, or None when the shapes differ (not comparable). Non-finite
    entries (masks hold -inf) must sit at the same places with the same values."""
    if ref.shape != got.shape:
        return None
    ref, got = ref.detach().double(), got.detach().double()
    same_special = (ref == got) | (ref.isnan() & got.isnan())
    finite = ref.isfinite() & got.isfinite()
    if not bool((finite | same_special).all()):
        return Error(math.inf, math.inf)
    if not bool(finite.any()):
        return Error(0.0, 0.0)
    diff = (ref[finite] - got[finite]).abs().max().item()
    scale = max(ref[finite].abs().max().item(), SCALE_FLOOR)
    return Error(diff, diff / scale)


def worst(errors: Sequence[Error]) -> Error:
    return max(errors, key=lambda e: e.rel, default=Error(0.0, 0.0))


@dataclass(frozen=True)
class Divergence:
    """The first node whose value (or gradient) is off by more than the contract allows."""

    node: str
    op: str
    shape: tuple
    error: Error
    made_by: str  # the pass that created or rewrote it, or what its inputs came from
    hint: str = ""
    module: str = ""  # the module path it runs in


@dataclass
class CheckReport:
    pipeline: str
    contract: Equivalence
    where: str  # "1 process", "2 gloo ranks (tp=2)"
    batches: int
    outputs: list[tuple[tuple, Error]] = field(default_factory=list)
    gradients: tuple[int, str, Error] | None = None  # parameters compared, the worst, its error
    gradients_skipped: int = 0  # not trainable parameters of the program (int8 buffers), or in another shape
    gradients_missing: tuple[str, ...] = ()  # trainable in the program, yet it gave them no gradient
    nodes_compared: int = 0  # before the first wrong one, if any
    nodes_total: int = 0  # the original's values
    first_wrong_value: Divergence | None = None
    first_wrong_gradient: Divergence | None = None

    @property
    def output_error(self) -> Error:
        return worst([e for _, e in self.outputs])

    @property
    def passed(self) -> bool:
        """Within the contract (a pipeline that changes the function by design passes: the
        report states the change)."""
        if self.contract.kind == "changes":
            return True
        errors = [e for _, e in self.outputs] + ([self.gradients[2]] if self.gradients else [])
        return bool(self.outputs) and not self.gradients_missing and all(e.rel <= self.contract.bound for e in errors)

    def lines(self) -> list[str]:
        bound = self.contract.bound
        out = [f"check {self.pipeline or '(no passes)'} on {self.where}, {self.batches} seeded batches "
               f"against the original", f"  contract: {self.contract}"]
        for i, (shape, err) in enumerate(self.outputs):
            out.append(f"  output {i} {list(shape)}: {err}{_mark(err, bound, self.contract)}")
        if self.gradients:
            count, name, err = self.gradients
            out.append(f"  gradients of {count} parameters: {err} (worst: {name}){_mark(err, bound, self.contract)}")
        if self.gradients_missing:
            names = ", ".join(self.gradients_missing[:3]) + (", ..." if len(self.gradients_missing) > 3 else "")
            out.append(f"  gradients of {len(self.gradients_missing)} parameters missing (trainable in the program, "
                       f"which gave them none): {names}{'  MISMATCH' if self.contract.kind != 'changes' else ''}")
        if self.gradients_skipped:
            out.append(f"  gradients of {self.gradients_skipped} parameters not compared (the program holds them as "
                       f"buffers, or in a shape that does not match the original's)")
        if self.first_wrong_value is None and self.nodes_total:
            out.append(f"  every node's value within the bound: {self.nodes_compared} of the original's "
                       f"{self.nodes_total} compared (the rest have no counterpart of the same shape)")
        label = "the function first changes at" if self.contract.kind == "changes" else "first wrong value"
        if self.first_wrong_value is not None and self.passed and self.contract.kind != "changes":
            label += " (it does not reach the outputs)"
        for what, div in ((label, self.first_wrong_value), ("first wrong gradient flows into", self.first_wrong_gradient)):
            if div is not None:
                where = f" in {div.module}" if div.module else ""
                out.append(f"  {what}: {div.node} = {div.op}{where} {list(div.shape)}: {div.error}")
                out.append(f"    made by: {div.made_by}")
                if div.hint:
                    out.append(f"    {div.hint}")
        if self.contract.kind == "changes":
            out.append(f"verdict: changes the function by design ({self.contract.reason}); output {self.output_error}")
        else:
            out.append("verdict: " + ("same function within the contract" if self.passed else "MISMATCH"))
        return out

    def __str__(self):
        return "\n".join(self.lines())


def _mark(err: Error, bound: float, contract: Equivalence) -> str:
    if contract.kind == "changes":
        return ""
    return "  ok" if err.rel <= bound else f"  MISMATCH (bound {bound:.0e})"


# ------------------------------------------------------------------ where it goes wrong


def first_divergence(reference: fx.GraphModule, transformed: fx.GraphModule, ref: Run, got: Run, bound: float,
                     *, gradients: bool = False, distributed: bool = False) -> tuple[int, Divergence | None]:
    """Walk the original graph in order (reverse order for gradients: they flow from the
    output) and return how many nodes were comparable and the first one off by more than
    `bound`. Nodes are matched by name: passes keep the names of the nodes they keep."""
    ref_table, got_table = (ref.grads, got.grads) if gradients else (ref.values, got.values)
    nodes = {n.name: n for n in transformed.graph.nodes}
    order = list(reference.graph.nodes)
    compared = 0
    for node in (reversed(order) if gradients else order):
        if node.name not in ref_table or node.name not in got_table or node.name not in nodes:
            continue
        err = error(ref_table[node.name], got_table[node.name])
        if err is None:
            continue
        compared += 1
        if err.rel > bound:
            return compared, _divergence(nodes[node.name], tuple(ref_table[node.name].shape), err, gradients,
                                         distributed)
    return compared, None


def _divergence(node: fx.Node, shape: tuple, err: Error, gradient: bool, distributed: bool) -> Divergence:
    return Divergence(node.name, str(node.target), shape, err, made_by(node), _hint(node, gradient, distributed),
                      _module(node))


def _module(node: fx.Node) -> str:
    """The module the node runs in (the graph's names say little on their own)."""
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()))[0] if stack else ""
    return path if isinstance(path, str) else ""


def made_by(node: fx.Node) -> str:
    """The pass that made this node (bmc.origin), else the passes that made its inputs."""
    origin = ir.get(node, ir.Origin)
    if origin is not None:
        how = "rewrote it" if origin.source == node.name else f"inserted it after {origin.source}" \
            if origin.source else "inserted it"
        later = [p for p in node.meta.get(TOUCHED_KEY, ()) if p != origin.pass_name]
        return f"{origin.pass_name} ({how})" + (f"; then changed by {', '.join(later)}" if later else "")
    inputs = [f"{a.name} from {o.pass_name}" for a in node.all_input_nodes if (o := ir.get(a, ir.Origin))]
    if inputs:
        return "no pass touched it; its inputs: " + ", ".join(inputs)
    return "no pass touched it or its inputs (the difference comes from further up, or from the weights)"


def _hint(node: fx.Node, gradient: bool, distributed: bool) -> str:
    """What the placements say is wrong, where they say it: a partial sum over the tp ranks
    read as if whole, or a value whose gradient is summed nowhere."""
    partial = [a.name for a in node.all_input_nodes
               if (p := tp_placement(a)) is not None and p.kind == "partial"]
    if partial and not gradient:
        return (f"it reads {', '.join(partial)}, a partial sum over the tp ranks, with no all-reduce in between "
                f"(insert-collectives' g)")
    if gradient and distributed:
        return ("the gradients of its users disagree: one of them (or a collective between) drops or doubles a "
                "sum over ranks in backward (insert-collectives' f)")
    return ""
