"""Runtime of the pp pass: the graph cut into stage modules at its bmc::pipe markers, run
by torch.distributed.pipelining's schedules (GPipe, 1F1B, interleaved 1F1B).

Stage s's module takes what enters stage s (for stage 0 the program's inputs, flattened)
and returns what leaves it, in graph order; values derived from weights and buffers only
are recomputed in each stage that reads them rather than sent. The last stage returns the
graph's loss when the graph computes one (the model was traced with its targets), so the
schedule's loss function is the identity; otherwise the caller gives one.

A weight two stages read (tied embeddings: the embedding in the first stage, the head in
the last) is held by both; their gradients are summed over the ranks holding it after each
step (Megatron's embedding group), so the copies stay equal.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.distributed as dist
import torch.fx as fx
from torch.fx._pytree import tree_flatten_spec

from bmc import ir
import bmc.ir.ops  # noqa: F401 - the bmc::pipe ops this module names at import
from bmc.errors import BackendError
from bmc.analysis.graph_patterns import is_free
from bmc.ir.trace import set_trace_info, trace_info

PIPE = torch.ops.bmc.pipe.default

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ cutting the graph


def _stage(node: fx.Node) -> int | None:
    annotation = ir.get(node, ir.Stage)
    return annotation.index if annotation is not None else None


def stage_graph(gm: fx.GraphModule, s: int, total: int) -> fx.GraphModule:
    """Stage `s` of a pp-annotated graph as its own GraphModule."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    free: dict[fx.Node, bool] = {}
    if s == 0:
        inputs = list(gm.graph.find_nodes(op="placeholder"))
    else:
        inputs = [n for n in gm.graph.nodes if n.target is PIPE and _stage(n) == s]
    for node in inputs:
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)

    def value(node: fx.Node) -> fx.Node:
        if node in env:
            return env[node]
        if is_free(node, free):  # recomputed here rather than received
            env[node] = graph.node_copy(node, value)
            return env[node]
        if isinstance(node.meta.get("val"), torch.SymInt):
            env[node] = _size_from_inputs(graph, node, inputs, env)
            return env[node]
        where = _stage(node)
        raise BackendError(f"stage {s} reads %{node.name}, computed in stage {where} without a bmc::pipe "
                           f"marker: a pass rewrote the graph after pp; put pp last among the rewriting passes")

    for node in gm.graph.nodes:
        if node.op == "call_function" and _stage(node) == s and not (node.target is PIPE and node in env):
            env[node] = graph.node_copy(node, value)
    if s < total - 1:
        leaving = [n.args[0] for n in gm.graph.nodes if n.target is PIPE and _stage(n) == s + 1]
        graph.output(tuple(value(n) for n in leaving))
    else:
        leaves = _output_leaves(gm)
        loss = loss_leaf(gm)
        if loss is not None:  # the step needs the loss only (Hugging Face models return logits too)
            leaves = [leaves[loss]]
        leaves = [value(n) if isinstance(n, fx.Node) else n for n in leaves]
        graph.output(leaves[0] if len(leaves) == 1 else tuple(leaves))
    stage = fx.GraphModule(gm, graph, class_name=f"Stage{s}")
    ir.copy_plans(gm, stage)
    set_trace_info(stage, trace_info(gm))
    return stage


def _size_from_inputs(graph: fx.Graph, node: fx.Node, inputs: list[fx.Node], env: dict) -> fx.Node:
    """A symbolic size (batch, sequence) computed in an earlier stage, read here off a
    received tensor that has it as a dim, rather than sent."""
    want = node.meta["val"].node.expr
    for source in inputs:
        val = source.meta.get("val")
        for dim, size in enumerate(val.shape if isinstance(val, torch.Tensor) else ()):
            if isinstance(size, torch.SymInt) and size.node.expr == want:
                size_node = graph.call_function(torch.ops.aten.sym_size.int, (env[source], dim))
                size_node.meta["val"] = node.meta["val"]
                return size_node
    raise BackendError(f"the symbolic size %{node.name} ({want}) is used in a later stage but no tensor entering "
                       f"that stage has it; trace with static shapes (dynamic=False)")


def _output_leaves(gm: fx.GraphModule) -> list:
    out = next(iter(gm.graph.find_nodes(op="output")))
    args = out.args[0]
    return list(args) if isinstance(args, (tuple, list)) else [args]


def loss_leaf(gm: fx.GraphModule) -> int | None:
    """Which output is the loss: the one scalar floating output, if the model computed its
    loss (it was traced with targets); None otherwise."""
    scalars = [i for i, leaf in enumerate(_output_leaves(gm))
               if isinstance(leaf, fx.Node) and isinstance(v := leaf.meta.get("val"), torch.Tensor)
               and v.dim() == 0 and v.dtype.is_floating_point]
    return scalars[0] if len(scalars) == 1 else None


def returns_loss(gm: fx.GraphModule) -> bool:
    return loss_leaf(gm) is not None


# ------------------------------------------------------------------ schedules


def _schedule_class(name: str):
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
    return {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved": ScheduleInterleaved1F1B}[name]


def _concrete(size) -> int:
    return size if isinstance(size, int) else int(size.node.hint)


def _zeros_like_val(node: fx.Node) -> torch.Tensor:
    val = node.meta["val"]
    # floating values carry gradients between stages (the static metadata says so)
    return torch.zeros([_concrete(d) for d in val.shape], dtype=val.dtype,
                       requires_grad=val.dtype.is_floating_point)


def _examples(stage: fx.GraphModule, op: str) -> tuple[torch.Tensor, ...] | torch.Tensor:
    """Zero tensors shaped like a stage's inputs (op="placeholder") or outputs ("output")."""
    if op == "placeholder":
        return tuple(_zeros_like_val(n) for n in stage.graph.find_nodes(op="placeholder"))
    out = next(iter(stage.graph.find_nodes(op="output"))).args[0]
    if isinstance(out, fx.Node):
        return _zeros_like_val(out)
    return tuple(_zeros_like_val(n) for n in out)


def _identity_loss(output, target):
    return output


class PipelineRuntime:
    """This rank's stages and the schedule that runs them."""

    def __init__(self, gm: fx.GraphModule, mesh, loss_fn: Callable | None = None):
        plan = ir.get_plan(gm, ir.PipelinePlan)
        self.gm = gm
        self.plan = plan
        self.total = plan.total_stages
        self.microbatches = plan.microbatches
        self.pp_group = mesh.get_group("pp")
        self.pp_rank, self.pp_size = dist.get_rank(self.pp_group), dist.get_world_size(self.pp_group)
        if self.pp_size != plan.stages:
            raise BackendError(f"the plan has {plan.stages} pipeline ranks but the mesh's pp dimension has "
                               f"{self.pp_size}")
        self.all_stages = [stage_graph(gm, s, self.total) for s in range(self.total)]
        self.mine = list(range(self.pp_rank, self.total, self.pp_size))
        self.modules = [self.all_stages[s] for s in self.mine]
        self.loss_is_output = returns_loss(gm)
        self.loss_fn = _identity_loss if self.loss_is_output else loss_fn
        self.ties = self._tie_groups(mesh)
        self.stages = self._build_stages()
        self.schedule = self._build_schedule(self.loss_fn) if self.loss_fn is not None else None

    # ---------------------------------------------------------------- setup

    def _build_stages(self):
        from torch.distributed.pipelining import PipelineStage
        device = torch.device("cpu")
        # Shapes given up front (from the graph's vals): inferred at run time, the stage would
        # run forward once on uninitialized buffers, and embedding lookups and the loss fail
        # on garbage indices.
        stages = [PipelineStage(self.all_stages[s], s, self.total, device, group=self.pp_group,
                                input_args=_examples(self.all_stages[s], "placeholder"),
                                output_args=_examples(self.all_stages[s], "output"))
                  for s in self.mine]
        return stages

    def _build_schedule(self, loss_fn):
        cls = _schedule_class(self.plan.schedule)
        if self.plan.schedule == "interleaved":
            return cls(self.stages, self.microbatches, loss_fn=loss_fn)
        return cls(self.stages[0], self.microbatches, loss_fn=loss_fn)

    def use_loss(self, loss_fn: Callable) -> None:
        """The caller's loss for a graph that returns outputs (ignored when the graph computes it)."""
        if self.loss_is_output or loss_fn is self.loss_fn:
            return
        self.loss_fn = loss_fn
        self.schedule = self._build_schedule(loss_fn)

    def _tie_groups(self, mesh) -> list[tuple[torch.nn.Parameter, object]]:
        """(parameter, process group) for each weight held by stages on several pp ranks;
        every rank creates every group, in the same order (new_group is collective)."""
        holders: dict[int, tuple[torch.nn.Parameter, set[int]]] = {}
        for s, module in enumerate(self.all_stages):
            for p in module.parameters():
                holders.setdefault(id(p), (p, set()))[1].add(s % self.pp_size)
        ties = []
        layout = mesh.mesh  # global ranks, shape (pp, dp, tp)
        for p, ranks in holders.values():
            if len(ranks) < 2 or not p.requires_grad:
                continue
            pp_ranks = sorted(ranks)
            mine = None
            for d in range(layout.shape[1]):
                for t in range(layout.shape[2]):
                    members = [int(layout[r, d, t]) for r in pp_ranks]
                    group = dist.new_group(members)
                    if dist.get_rank() in members:
                        mine = (group, members[0])
            if self.pp_rank in pp_ranks:
                group, first = mine
                dist.broadcast(p.data, src=first, group=group)  # the copies start equal
                ties.append((p, group))
        return ties

    # ---------------------------------------------------------------- running

    def flatten(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        codegen = self.gm.graph._codegen
        spec = getattr(getattr(codegen, "pytree_info", None), "in_spec", None)
        flat = tree_flatten_spec((args, kwargs), spec) if spec is not None else list(args)
        self._check_batch(flat)
        # inputs a stage passes on are sent as they are, and send wants contiguous memory
        return [t.contiguous() if isinstance(t, torch.Tensor) else t for t in flat]

    def _check_batch(self, flat: list) -> None:
        placeholders = list(self.gm.graph.find_nodes(op="placeholder"))
        for node, value in zip(placeholders, flat):
            val = node.meta.get("val")
            if not isinstance(value, torch.Tensor) or not isinstance(val, torch.Tensor) or val.dim() == 0:
                continue
            batch = value.shape[0]
            if batch % self.microbatches:
                raise BackendError(f"input {node.name} has batch {batch}, which {self.microbatches} microbatches "
                                   f"do not divide; use a multiple of {self.microbatches}")
            traced = val.shape[0]
            if isinstance(traced, int) and batch // self.microbatches != traced:
                raise BackendError(f"the graph was traced with batch {traced} (static), so a pipelined step takes "
                                   f"{self.microbatches} microbatches x {traced} = {traced * self.microbatches} "
                                   f"rows, got {batch}; trace one microbatch's inputs or trace with dynamic=True")

    def run(self, flat: list[torch.Tensor], target, train: bool) -> list[torch.Tensor]:
        """One step over the microbatches; the last stage's per-microbatch losses."""
        if self.loss_fn is None:
            raise BackendError("the graph does not compute its loss (it returns outputs): pass loss_fn= "
                               "(output, target) -> loss and target= to step(), or trace the model with its targets")
        if target is None:
            if not self.loss_is_output:
                raise BackendError("step() with loss_fn needs target= (what the loss compares the outputs with)")
            target = torch.zeros(flat[0].shape[0])  # the graph computes the loss; the schedule wants a target
        losses: list[torch.Tensor] = []
        if train:
            self.schedule.step(*flat, target=target, losses=losses, return_outputs=False)
        else:
            with torch.no_grad():  # outputs are not merged: scalar losses do not concatenate
                self.schedule.eval(*flat, target=target, losses=losses, return_outputs=False)
        return losses

    def sum_tied_gradients(self) -> None:
        for p, group in self.ties:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=group)

    def mean_loss(self, losses: list[torch.Tensor]) -> torch.Tensor:
        """The step's loss (mean over microbatches) on every rank, from the last stage."""
        last = (self.total - 1) % self.pp_size
        value = torch.stack([loss.detach().float() for loss in losses]).mean() if losses else torch.zeros(())
        dist.broadcast(value, src=dist.get_global_rank(self.pp_group, last), group=self.pp_group)
        return value

    def tied_duplicates(self) -> set[int]:
        """Tied weights this rank holds as a second copy (not counted twice in a global norm)."""
        return {id(p) for p, group in self.ties if dist.get_rank(group) != 0}


class RankStages(torch.nn.Module):
    """This rank's stage modules under one module, for the optimizer: its parameters are the
    ones this rank holds; names resolve as in the whole graph."""

    def __init__(self, gm: fx.GraphModule, modules: list[fx.GraphModule], norm_skip: set[int]):
        super().__init__()
        self.stages = torch.nn.ModuleList(modules)
        self.meta = gm.meta
        self.norm_skip_ids = norm_skip
        self._whole = gm

    def get_parameter(self, target: str) -> torch.nn.Parameter:
        return self._whole.get_parameter(target)
