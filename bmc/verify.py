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
