"""The IR verifier: graph.lint() plus bmc's own invariants. The pass manager runs it after
every pass by default; the `verify` pass runs it on demand."""
from __future__ import annotations


import torch
import torch.fx as fx

from bmc import ir
from bmc.errors import VerificationError

# Ops that return nothing; export leaves them in the graph for their side effect.
_NO_VALUE_OPS = ("_assert", "assert_", "_assert_tensor_metadata", "sym_constrain_range")


def _produces_value(node: fx.Node) -> bool:
    if node.op == "call_module" and node.target == "_guards_fn":
        return False  # export's runtime check of input shapes; it returns nothing
    return node.op in ("placeholder", "get_attr", "call_function", "call_module", "call_method") \
        and not any(name in str(node.target) for name in _NO_VALUE_OPS)


def _is_submodule(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "get_attr":
        return False
    try:
        return isinstance(gm.get_submodule(str(node.target)), torch.nn.Module)
    except AttributeError:
        return False


def _check_shapes(gm: fx.GraphModule, node: fx.Node) -> None:
    if _produces_value(node) and "val" not in node.meta and not _is_submodule(gm, node):
        raise VerificationError(f"node %{node.name} ({ir.target_str(node)}) has no meta['val']: "
                                f"a pass created it without copying meta (use ir.replace_node / ir.copy_meta)")


def _check_shard(node: fx.Node) -> None:
    shard = ir.get(node, ir.Shard)
    val = ir.tensor_val(node)
    if shard is None or val is None:
        return
    for placement in shard.placements:
        if placement.kind == "shard" and not 0 <= placement.dim < val.dim():
            raise VerificationError(f"node %{node.name}: bmc.shard splits dim {placement.dim} of a "
                                    f"{val.dim()}-d tensor over '{placement.axis}'")


def _check_attr(gm: fx.GraphModule, node: fx.Node) -> None:
    if node.op != "get_attr":
        return
    owner = gm
    for part in str(node.target).split("."):
        if not hasattr(owner, part):
            raise VerificationError(f"node %{node.name} reads attribute '{node.target}', which the module lacks")
        owner = getattr(owner, part)


def _check_stages(gm: fx.GraphModule) -> None:
    last = -1
    for node in gm.graph.nodes:
        stage = ir.get(node, ir.Stage)
        if stage is None:
            continue
        if stage.index < last:
            raise VerificationError(f"node %{node.name} is on pipeline stage {stage.index} after a node "
                                    f"on stage {last}: stages must not go backwards in program order")
        last = stage.index


def _check_tp_plan(gm: fx.GraphModule) -> None:
    plan = ir.get_plan(gm, ir.TensorParallelPlan)
    if plan is None:
        return
    if plan.degree < 2:
        raise VerificationError(f"the tp plan has degree {plan.degree}; a plan splits over >= 2 ranks")
    nodes: dict[str, fx.Node] = {}
    for module in gm.modules():  # fused regions read their weights inside their own graphs
        if isinstance(module, fx.GraphModule):
            for name, node in ir.parameter_nodes(module).items():
                nodes.setdefault(name, node)
    for layout in plan.layouts:
        node = nodes.get(layout.param)
        shard = ir.get(node, ir.Shard) if node is not None else None
        if node is None or shard is None or "tp" not in shard.sharded_axes().get(layout.dim, ()):
            raise VerificationError(f"the tp plan splits {layout.param} on dim {layout.dim}, but the graph "
                                    f"{'does not read it' if node is None else 'does not place it so'}")
        local = ir.tensor_val(node).shape[layout.dim]
        if local * plan.degree != sum(layout.segments) or any(s % plan.degree for s in layout.segments):
            raise VerificationError(f"the tp plan's segments {layout.segments} of {layout.param} do not cut into "
                                    f"{plan.degree} equal pieces of {local} rows each")


def _check_pp_plan(gm: fx.GraphModule) -> None:
    plan = ir.get_plan(gm, ir.PipelinePlan)
    stages = {s.index for n in gm.graph.nodes if (s := ir.get(n, ir.Stage)) is not None}
    if plan is None:
        if stages:
            raise VerificationError("nodes carry bmc.stage but the graph has no pipeline plan")
        return
    if plan.total_stages % plan.stages or len(plan.bounds) != plan.total_stages + 1:
        raise VerificationError(f"the pipeline plan's {plan.total_stages} stages do not fit {plan.stages} ranks "
                                f"and {len(plan.bounds) - 1} cuts")
    if stages and max(stages) >= plan.total_stages:
        raise VerificationError(f"a node is on stage {max(stages)} of a {plan.total_stages}-stage plan")


def _check_dp_plan(gm: fx.GraphModule) -> None:
    plan = ir.get_plan(gm, ir.DataParallelPlan)
    stages = {z.stage for n in gm.graph.find_nodes(op="get_attr") if (z := ir.get(n, ir.Zero)) is not None}
    if plan is not None and stages - {plan.stage}:
        raise VerificationError(f"the data-parallel plan is ZeRO stage {plan.stage} but parameters are marked "
                                f"stage {sorted(stages - {plan.stage})}")


def _check_amp_plan(gm: fx.GraphModule) -> None:
    plan = ir.get_plan(gm, ir.AmpPlan)
    if plan is None:
        return
    if plan.dtype not in ("bf16", "fp16"):
        raise VerificationError(f"the amp plan's dtype is {plan.dtype!r}; expected bf16 or fp16")
    for buffer in (plan.scale_buffer, plan.growth_buffer):
        if buffer is not None and not hasattr(gm, buffer):
            raise VerificationError(f"the amp plan keeps its loss scale in {buffer}, which the module lacks")


def check_plans(gm: fx.GraphModule) -> None:
    """The graph's plans are typed and agree with the graph they describe."""
    ir.check_plans(gm)
    for check in (_check_tp_plan, _check_pp_plan, _check_dp_plan, _check_amp_plan):
        check(gm)


def verify_graph(gm: fx.GraphModule, after: str | None = None) -> None:
    """Raise VerificationError (one line, naming the pass that broke it) if the graph is not valid."""
    where = f"after pass '{after}': " if after else ""
    try:
        gm.graph.lint()
        for node in gm.graph.nodes:
            ir.check_annotations(node)
            _check_shapes(gm, node)
            _check_shard(node)
            _check_attr(gm, node)
        _check_stages(gm)
        check_plans(gm)
        gm.recompile()
    except VerificationError as exc:
        raise VerificationError(f"{where}invalid graph: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - lint and recompile raise plain exceptions
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise VerificationError(f"{where}invalid graph: {first}") from None


def is_valid(gm: fx.GraphModule) -> bool:
    try:
        verify_graph(gm)
    except VerificationError:
        return False
    return True


__all__ = ["verify_graph", "is_valid"]
