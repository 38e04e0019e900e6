"""Regions: a block's nodes fused into a submodule that a wrapper runs (insert-remat runs it
under torch.utils.checkpoint, insert-offload with its saved tensors in host memory), and the
cost model's ledger of what each block saves for backward, to choose which to wrap."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any
from dataclasses import dataclass, field

import sympy
import torch
from torch import fx
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

from bmc import ir
from bmc.analysis import cost
from bmc.analysis.structure import structure_of
from bmc.errors import PipelineError
from bmc.ir.trace import trace_info

Nodes = dict[fx.Node, None]  # an ordered set of nodes


def block_nodes(gm: fx.GraphModule, block: str) -> Nodes:
    """The computing nodes of one block, found by the module that produced them."""
    inside = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        path = ir.module_path(node)
        if path == block or path.startswith(block + "."):
            inside[node] = None
    return inside


def repeated_blocks(gm: fx.GraphModule, pass_name: str) -> list[tuple[str, Nodes]]:
    """Each repeated block (structure analysis) with its computing nodes."""
    found = [(b.name, block_nodes(gm, b.name)) for b in structure_of(gm).blocks]
    found = [(name, nodes) for name, nodes in found if nodes]
    if not found:
        raise PipelineError(f"{pass_name} found no repeated blocks in this model "
                            f"(bmc-opt --analyze shows what the structure analysis sees)")
    return found


def fuse_regions(gm: fx.GraphModule, regions: list[Nodes], prefix: str) -> tuple[fx.GraphModule, list[fx.Node]]:
    """Fuse each region into a submodule `{prefix}{i}`; returns the graph and the
    call_module node of each region, in the order given."""
    gm = fuse_by_partitions(gm, regions, prefix=prefix, always_return_tuple=True)
    by_target = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    calls = []
    for index in range(len(regions)):
        node = by_target[f"{prefix}{index}"]  # fuse_by_partitions names the i-th one so
        node.meta["val"] = _output_val(gm.get_submodule(str(node.target)))
        node.meta["nn_module_stack"] = {}
        calls.append(node)
    return gm, calls


def wrap_region(gm: fx.GraphModule, fused: fx.Node, region: ir.Region) -> fx.Node:
    """Replace `call_module(sub)(*inputs)` by `wrapper(sub, *inputs)`, so the dumped graph shows
    what runs the region. Every node inside carries `region`, which a .pt2 archive keeps: a
    loaded program fuses the same regions again (restore_regions)."""
    fn, kwargs = WRAPPERS[region.wrapper]
    graph = gm.graph
    for node in gm.get_submodule(str(fused.target)).graph.nodes:
        if node.op == "call_function":
            ir.annotate(node, region)
    with graph.inserting_before(fused):
        submodule = graph.get_attr(str(fused.target))
        call = graph.call_function(fn, (submodule, *fused.args), kwargs)
    call.meta.update({k: v for k, v in fused.meta.items() if k in ir.CARRIED_META})
    if region.wrapper == "checkpoint":
        ir.annotate(call, ir.Remat(region.policy, region.name))
    ir.annotate(call, ir.Origin(region.pass_name, region.name))
    # export runs the region inline and gives its nodes the annotations of this call
    ir.annotate(call, region)
    fused.replace_all_uses_with(call)
    graph.erase_node(fused)
    return call


def restore_regions(gm: fx.GraphModule) -> fx.GraphModule:
    """Fuse again the regions a loaded graph's nodes say they belonged to (re-exporting a
    program runs its regions inline: the archive keeps each node's `bmc.region`)."""
    groups: dict[ir.Region, Nodes] = {}
    for node in gm.graph.nodes:
        region = ir.get(node, ir.Region)
        if node.op == "call_function" and region is not None:
            groups.setdefault(region, {})[node] = None
    if not groups:
        return gm
    gm, calls = fuse_regions(gm, list(groups.values()), prefix="region_")
    for region, fused in zip(groups, calls):
        wrap_region(gm, fused, region)
    gm.graph.lint()
    gm.recompile()
    return gm


def _output_val(sub: fx.GraphModule):
    """What the fused submodule returns, from the meta of the nodes it returns."""
    out = sub.graph.output_node().args[0]
    return tuple(a.meta.get("val") if isinstance(a, fx.Node) else a for a in out)


# ------------------------------------------------------------------ the cost model's ledger

def trace_substitutions(gm: fx.GraphModule) -> dict:
    """Values of the cost model's symbols at the traced example inputs: batch = dim 0 and
    sequence = dim 1 of the first tensor input (how trace.py names B and S)."""
    info = trace_info(gm)
    tensors = [t for t in (*info.args, *info.kwargs.values()) if isinstance(t, torch.Tensor) and t.dim() >= 1] \
        if info is not None else []
    if not tensors:
        return {}
    seq = int(tensors[0].shape[1]) if tensors[0].dim() >= 2 else None
    return cost.Setting(batch=int(tensors[0].shape[0]), seq=seq).substitutions(cost.parameters(gm))


def _number(expr: sympy.Expr, subs: dict, what: str) -> float:
    try:
        return cost.evaluate(expr, subs)
    except ValueError:
        raise PipelineError(f"cannot size {what}: the graph has symbolic sizes but no traced example inputs; "
                            f"trace it with bmc.trace(model, example_inputs)") from None


@dataclass
class Ledger:
    """Predicted saved-activation bytes, by tensor identity (a tensor saved twice counts once):
    what the nodes outside every block save, what each block saves when it runs plainly,
    what it saves when checkpointed (its inputs), and its forward FLOPs."""

    outside: dict[object, float] = field(default_factory=dict)
    plain: dict[str, dict[object, float]] = field(default_factory=dict)
    inputs: dict[str, dict[object, float]] = field(default_factory=dict)
    flops: dict[str, float] = field(default_factory=dict)

    def total(self, checkpointed=(), dropped=()) -> float:
        """Saved bytes with the blocks in `checkpointed` recomputed and those in `dropped`
        saving nothing on the device (offloaded)."""
        seen = dict(self.outside)
        for name, saved in self.plain.items():
            if name in dropped:
                continue
            seen.update(self.inputs[name] if name in checkpointed else saved)
        return sum(seen.values())


def ledger(gm: fx.GraphModule, blocks: list[tuple[str, Nodes]], subs: dict) -> Ledger:
    """The cost model's saved tensors and FLOPs of the unfused graph, split by block and
    evaluated at `subs`, so that any choice of blocks is priced without rewriting."""
    symbols, needs = cost.graph_symbols(gm), cost.nodes_needing_grad(gm)
    owner = {n: name for name, nodes in blocks for n in nodes}
    book = Ledger(plain={name: {} for name, _ in blocks}, inputs={name: {} for name, _ in blocks},
                  flops={name: 0.0 for name, _ in blocks})
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = owner.get(node)
        into = book.outside if name is None else book.plain[name]
        for identity, nbytes in cost.saved_tensors(node, symbols, needs):
            into.setdefault(identity, _number(nbytes, subs, "saved activations"))
        if name is None:
            continue
        book.flops[name] += _number(cost.node_flops(node, symbols), subs, "recompute FLOPs")
        for arg in node.all_input_nodes:
            if owner.get(arg) != name and arg.op != "get_attr" and ir.tensor_val(arg) is not None:
                # a checkpoint saves its region's inputs, each kept with the storage it views:
                # the cost model's "region-inputs" rule, with its own view-following helpers
                root = cost.storage_root(arg)
                book.inputs[name].setdefault(root, _number(cost.tensor_bytes(cost.root_val(arg), symbols),
                                                           subs, "checkpoint inputs"))
    return book


# ------------------------------------------------------------------ what runs a region

class HostSavedTensors(torch.autograd.graph.saved_tensors_hooks):
    """saved_tensors_hooks that keep each saved tensor in CPU memory until backward."""

    def __init__(self, pin_memory: bool):
        self.pin_memory = pin_memory
        # id(tensor) -> (tensor, its host copy): one copy per tensor however many ops save it.
        # Holding the tensor keeps its id from being reused before the region returns; the
        # device memory is released when the region returns and this object is dropped.
        self.copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        super().__init__(self.pack, self.unpack)

    def keeps(self, tensor: torch.Tensor) -> bool:
        """Left as it is: a tensor already in host memory, or a leaf that requires grad (a
        parameter, resident anyway: copying it would cost traffic and save nothing)."""
        return tensor.device.type == "cpu" or (tensor.requires_grad and tensor.grad_fn is None)

    def pack(self, tensor: torch.Tensor) -> Any:
        if self.keeps(tensor):
            return tensor
        key = id(tensor)
        if key not in self.copies:
            host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout,
                               pin_memory=self.pin_memory and not tensor.is_sparse)
            host.copy_(tensor, non_blocking=self.pin_memory)
            self.copies[key] = (tensor, host)
        return tensor.device, self.copies[key][1]

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        # the autograd graph keeps this object (its unpack hook) until backward: drop the
        # device tensors now, so only their host copies stay alive
        self.copies.clear()

    def unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=self.pin_memory)


def offload_saved(fn, *args):
    """Run `fn(*args)` with the tensors it saves for backward kept in CPU memory."""
    with HostSavedTensors(pin_memory=torch.cuda.is_available()):
        return fn(*args)


# what runs a fused region, by the name a Region annotation gives it
WRAPPERS: dict[str, tuple[Callable, dict]] = {
    "checkpoint": (torch.utils.checkpoint.checkpoint, {"use_reentrant": False}),
    "offload": (offload_saved, {}),
}
