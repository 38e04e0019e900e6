"""Graph properties: what passes and backends need, provide, break or refuse, declared once and
checked for a whole pipeline before any pass runs (MLIR's declared pass dependencies).

The vocabulary:

    shapes           every node has meta['val'] (a traced graph has it)
    cost             nodes carry bmc.cost (annotate-cost)
    calibration      calibration batches were given (bmc.compile(calibration=...), --calibration)
    tp-split         weights split for tensor parallelism (tp)
    tp-collectives   Megatron's f/g placed for the split (insert-collectives)
    staged           cut into pipeline stages (pp)
    mixed-precision  parameters in low precision (amp); loss-scaling: amp{dtype=fp16}
    data-parallel    parameters marked for dp / ZeRO; zero3: weights sharded and gathered
    fused-regions    blocks fused into submodules (insert-remat, insert-offload{what=activations})
    tapped           hidden states returned as outputs (tap)
    quantized        linears run as bmc::int8_linear (quant-int8)

A graph that was saved and loaded gets its properties back from its plans and annotations
(`graph_properties`), so a pipeline run on a loaded program is checked the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch.fx as fx

from bmc import ir
from bmc.errors import BackendError, PipelineError, RequirementError


@dataclass(frozen=True)
class Properties:
    """What one pass (with its options) requires, provides, invalidates, and forbids: a
    forbidden property must not hold when it runs, with the reason to give ("" for the
    generic one: run this pass before the one that provides it)."""

    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    invalidates: tuple[str, ...] = ()
    forbids: tuple[tuple[str, str], ...] = ()


# Properties most rewriting passes cannot run after: their rewrites would not see the stages,
# the insides of fused regions, or the fp32 weights.
REWRITES_BEFORE = (("staged", ""), ("fused-regions", ""))
WHY = {
    "staged": "{by} cuts the graph into stages, which {name} does not know about",
    "fused-regions": "{name} must run before passes that fuse regions (insert-remat, insert-offload), whose "
                     "insides it does not see",
    "quantized": "{name} reads the fp32 weights {by} turned into int8 (prune before quantizing)",
    "zero3": "ZeRO-3 already routes each weight through a gather that {name} would have to rewrite",
    "tp-split": "{name} would have to rewrite weights tp already split",
}
# Which pass gives a property a loaded graph already has, for the messages.
PROVIDER = {"tp-split": "tp", "tp-collectives": "insert-collectives", "staged": "pp", "mixed-precision": "amp",
            "loss-scaling": "amp{dtype=fp16}", "data-parallel": "dp/zero", "zero3": "zero{stage=3}",
            "fused-regions": "insert-remat/insert-offload", "tapped": "tap", "quantized": "quant-int8",
            "calibration": "calibration data", "shapes": "tracing", "cost": "annotate-cost"}


def graph_properties(gm: fx.GraphModule, calibration: bool = False) -> dict[str, str]:
    """The properties a graph has, read off its plans and annotations: property -> what gave it."""
    found = {"shapes": "tracing"}
    if calibration:
        found["calibration"] = "calibration data"
    tp = ir.get_plan(gm, ir.TensorParallelPlan)
    amp = ir.get_plan(gm, ir.AmpPlan)
    data = ir.get_plan(gm, ir.DataParallelPlan)
    offload = ir.get_plan(gm, ir.OffloadPlan)
    # fused regions hold their nodes in submodules: an int8 linear inside one is still there
    nodes = [n for m in gm.modules() if isinstance(m, fx.GraphModule) for n in m.graph.nodes]
    present = {
        "tp-split": tp is not None,
        "tp-collectives": tp is not None and tp.collectives is not None,
        "staged": ir.get_plan(gm, ir.PipelinePlan) is not None,
        "mixed-precision": amp is not None,
        "loss-scaling": amp is not None and amp.dtype == "fp16",
        "data-parallel": data is not None,
        "zero3": data is not None and data.stage == 3,
        "fused-regions": bool(offload and offload.activations) or any(ir.get(n, ir.Region) for n in nodes),
        "tapped": ir.get_plan(gm, ir.TapPlan) is not None,
        "quantized": any(ir.get(n, ir.Quant) for n in nodes),
    }
    found.update({prop: f"{PROVIDER[prop]}{IN_INPUT}" for prop, has in present.items() if has})
    return found


IN_INPUT = " (already in the input graph)"


def _refusal(name: str, prop: str, by: str, reason: str) -> PipelineError:
    if by.endswith(IN_INPUT):  # a loaded program: the fix is upstream, where it was built
        by = by.removesuffix(IN_INPUT)
        why = reason or WHY.get(prop, "").format(name=name, by=by)
        return PipelineError(f"{name} on a graph {by} already transformed{(': ' + why) if why else ''}; "
                             f"run {name} on the original model, before {by}")
    if by.split("{")[0] == name:
        return PipelineError(f"{name} appears twice in the pipeline: keep one {name}")
    if reason:  # a combination that is not supported in either order: the reason says what to do
        return PipelineError(f"{name} after {by}: {reason}")
    why = WHY.get(prop, "").format(name=name, by=by)
    return PipelineError(f"{name} after {by}: {why}; put {name} before {by} in the pipeline")


def _missing(name: str, need: str, broken_by: str | None, providers: list[str]) -> RequirementError:
    if need == "calibration":  # given with the inputs, not by a pass
        return RequirementError(f"{name} needs calibration data: pass calibration=[batch, ...] to bmc.compile "
                                f"(or --calibration FILE|builtin to bmc-opt)")
    fix = f"add {' or '.join(providers)} before it" if providers else "no registered pass provides it"
    why = f" (invalidated by '{broken_by}')" if broken_by else ""
    return RequirementError(f"pass '{name}' requires '{need}', which the pipeline does not provide there{why}; {fix}")


def check_pipeline(steps: list[tuple[str, str, Properties]], initial: Mapping[str, str],
                   providers: Mapping[str, list[str]]) -> dict[str, str]:
    """Walk the pipeline's declared properties from `initial` (property -> what gave it);
    raise the first one-line error that names the fix. Returns the properties at the end."""
    available = dict(initial)
    broken_by: dict[str, str] = {}
    for name, label, props in steps:
        for need in props.requires:
            if need not in available:
                raise _missing(label, need, broken_by.get(need), providers.get(need, []))
        for prop, reason in props.forbids:
            if prop in available:
                raise _refusal(name, prop, available[prop], reason)
        for prop in props.invalidates:
            available.pop(prop, None)
            broken_by[prop] = name
        for prop in props.provides:
            available[prop] = label
    return available


def check_backend(backend, available: Mapping[str, str]) -> None:
    """What the backend needs of the pipeline's result, before any pass runs."""
    for prop in backend.requires:
        if prop not in available:
            raise BackendError(f"the {backend.name} backend needs '{prop}', which the pipeline does not provide")
    for prop, why in backend.refuses:
        if prop in available:
            raise BackendError(f"the {backend.name} backend cannot run a graph that is '{prop}' "
                               f"(by {available[prop]}): {why}")
    for present, needed, fix in backend.implies:
        if present in available and needed not in available:
            raise BackendError(fix)
