"""pp: pipeline parallelism — the graph cut into stages at block boundaries, balanced by cost.

Each residual block is one unit (what comes before the first block joins the first, what
comes after the last joins the last: the embedding and the head are counted). Stage costs
come from the cost model: time is forward + backward FLOPs, memory is the weights, gradients
and optimizer states a stage holds plus its saved activations times the microbatches it
keeps in flight under the schedule. The partition minimizes the most expensive stage's time
(`balance=time`, the default: a pipeline runs at the pace of its slowest stage) or memory
(`balance=memory`), over contiguous cuts, subject to `memory_limit` when one is given.

Every node gets a `bmc.stage` annotation, and every value that crosses a boundary passes
through a `bmc::pipe(x, stage)` marker for each stage it enters, so the dump shows exactly
what each stage receives. Values derived only from weights and buffers (RoPE tables, masks
built from constants) are not sent: the backend recomputes them in every stage that reads
them. The torch backend cuts the graph at the markers and runs the stages with
torch.distributed.pipelining's schedules (backends/pipeline.py).

pp runs after the passes that rewrite the graph (tp, amp, insert-remat, insert-offload):
they do not know about stage boundaries, and those passes refuse to run after it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Optional

import sympy
import torch
import torch.fx as fx

import bmc.ir.ops  # noqa: F401 - registers bmc::pipe
from bmc import ir
from bmc.analysis import cost
from bmc.errors import PipelineError
from bmc.passmgr.manager import Pass, PassResult, register_pass, register_preset
from bmc.analysis.graph_patterns import is_free
from bmc.analysis.structure import structure_of
from bmc.ir.trace import trace_info

log = logging.getLogger(__name__)
PIPE = torch.ops.bmc.pipe.default
SCHEDULES = ("gpipe", "1f1b", "interleaved")


@dataclass(frozen=True)
class PpOptions:
    stages: int = 2  # pipeline ranks
    schedule: Literal["gpipe", "1f1b", "interleaved"] = "1f1b"
    microbatches: int = 0  # 0: as many as pipeline stages in all
    virtual: int = 0  # stages per rank (interleaved); 0: 2 for interleaved, else 1
    balance: Literal["time", "memory"] = "time"
    memory_limit: Optional[float] = None  # bytes per stage (model states + activations)

    def __post_init__(self):
        if self.stages < 1:
            raise ValueError(f"stages must be >= 1, got {self.stages}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.microbatches < 0 or self.virtual < 0:
            raise ValueError("microbatches and virtual must be >= 0")
        if self.virtual > 1 and self.schedule != "interleaved":
            raise ValueError(f"virtual={self.virtual} stages per rank needs schedule=interleaved")

    @property
    def stages_per_rank(self) -> int:
        return self.virtual or (2 if self.schedule == "interleaved" else 1)

    @property
    def total_stages(self) -> int:
        return self.stages * self.stages_per_rank

    @property
    def num_microbatches(self) -> int:
        return self.microbatches or self.total_stages


# ------------------------------------------------------------------ units: blocks and their nodes


def node_units(gm: fx.GraphModule) -> tuple[dict[fx.Node, int], int]:
    """Each computing node's unit (its block's index; before the first block: 0, after the
    last: the last), never earlier than its inputs' units; and the number of blocks."""
    blocks = structure_of(gm).blocks
    if not blocks:
        raise PipelineError("pp needs residual blocks to cut between, and structure analysis found none "
                            "in this model; pipeline parallelism is not possible here")
    index = {block.name: block.index for block in blocks}
    free: dict[fx.Node, bool] = {}
    units: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or is_free(node, free):
            continue
        own = _block_index(ir.module_path(node), index)
        if own is None and not isinstance(node.meta.get("val"), torch.Tensor):
            # a region (insert-remat's checkpoint, insert-offload's) returns a tuple and has no
            # module of its own: it belongs to the block of the values taken out of it
            taken = [_block_index(ir.module_path(u), index) for u in node.users]
            own = min((t for t in taken if t is not None), default=None)
        after_inputs = max((units[a] for a in node.all_input_nodes if a in units), default=0)
        units[node] = max(own if own is not None else 0, after_inputs)
    _defer_input_only(gm, units, len(blocks) - 1, free)
    return units, len(blocks)


def _defer_input_only(gm: fx.GraphModule, units: dict[fx.Node, int], last: int, free: dict) -> None:
    """Values computed from the inputs alone (the targets reshaped for the loss, masks) move
    to their first reader's unit: the raw input crosses the boundaries instead of them."""
    params = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    weighted: set[fx.Node] = set()  # reads a parameter, directly or not
    input_only: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if (node.op == "get_attr" and str(node.target) in params) or any(a in weighted for a in node.all_input_nodes):
            weighted.add(node)
        elif node in units and all(a.op == "placeholder" or is_free(a, free) or a in input_only
                                   for a in node.all_input_nodes):
            input_only.add(node)
    for node in reversed(list(units)):
        if node in input_only:
            readers = [last if u.op == "output" else units[u] for u in node.users if u.op == "output" or u in units]
            if readers:
                units[node] = min(readers)


def reorder_by_stage(gm: fx.GraphModule, stage_of: dict[fx.Node, int]) -> None:
    """Program order with inputs, weights and stage-free values first, then stage by stage
    (each stage's markers at its start), keeping the original order within a stage; valid
    because no node's stage is earlier than its inputs'."""
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    order = {n: i for i, n in enumerate(nodes)}
    key = {n: (-1 if n not in stage_of else stage_of[n], 0 if n.target is PIPE else 1, order[n]) for n in nodes}
    ordered = sorted(nodes, key=key.__getitem__)
    anchor = next(iter(gm.graph.find_nodes(op="output")))
    for node in ordered:
        anchor.prepend(node)


def _block_index(path: str, index: dict[str, int]) -> int | None:
    while path:
        if path in index:
            return index[path]
        path = path.rpartition(".")[0]
    return None


# ------------------------------------------------------------------ costs


@dataclass(frozen=True)
class UnitCosts:
    flops: list[float]  # forward + backward FLOPs of one microbatch, per unit
    states: list[float]  # bytes of weights + gradients + optimizer states, per unit
    activations: list[float]  # bytes saved for backward by one microbatch, per unit


def _example_setting(gm: fx.GraphModule) -> dict:
    info = trace_info(gm)
    shape = next((a.shape for a in (*(info.args if info else ()), *(info.kwargs.values() if info else ()))
                  if isinstance(a, torch.Tensor) and a.dim() >= 2), (1, 1))
    return cost.Setting(batch=int(shape[0]), seq=int(shape[1])).substitutions(cost.parameters(gm))


def _example_sizes(gm: fx.GraphModule) -> dict[str, int]:
    """Every symbolic input size by name, at the traced example's value (a second input's
    batch and sequence are symbols of their own)."""
    sizes = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        for size in (val.shape if isinstance(val, torch.Tensor) else ()):
            if isinstance(size, torch.SymInt) and size.node.hint is not None:
                sizes[str(size.node.expr)] = int(size.node.hint)
    return sizes


def _evaluator(gm: fx.GraphModule):
    subs, sizes = _example_setting(gm), _example_sizes(gm)

    def evaluate(expr) -> float:
        expr = sympy.sympify(expr).subs(subs)
        return cost.evaluate(expr, {sym: sizes[str(sym)] for sym in expr.free_symbols if str(sym) in sizes})
    return evaluate


def unit_costs(gm: fx.GraphModule, units: dict[fx.Node, int], count: int) -> UnitCosts:
    evaluate = _evaluator(gm)
    symbols, needs = cost.graph_symbols(gm), cost.nodes_needing_grad(gm)
    flops, states, acts = [0.0] * count, [0.0] * count, [0.0] * count
    held: set[tuple[int, str]] = set()
    saved: set[object] = set()
    setup = cost.TrainingSetup()
    trainable = {name for name, p in gm.named_parameters(remove_duplicate=False) if p.requires_grad}
    for node, unit in units.items():
        # backward costs about twice the forward (a gradient for the input and one for the weight)
        flops[unit] += 3 * evaluate(cost.node_flops(node, symbols))
        for identity, nbytes in cost.saved_tensors(node, symbols, needs):
            if identity not in saved:
                saved.add(identity)
                acts[unit] += evaluate(nbytes)
        for arg in node.all_input_nodes:
            val = ir.tensor_val(arg)
            if arg.op != "get_attr" or val is None or (unit, str(arg.target)) in held:
                continue
            held.add((unit, str(arg.target)))  # a weight two stages read is held by both
            per_element = val.element_size()
            if str(arg.target) in trainable:
                per_element += val.element_size() + setup.optimizer_bytes(val.dtype)
            states[unit] += val.numel() * per_element
    return UnitCosts(flops, states, acts)


def in_flight(schedule: str, stage: int, stages: int, microbatches: int) -> int:
    """Microbatches whose activations stage `stage` holds at its peak."""
    if schedule == "gpipe":
        return microbatches
    return min(microbatches, stages - stage)


@dataclass(frozen=True)
class Partition:
    bounds: tuple[int, ...]  # first unit of each stage, then the unit count
    time: tuple[float, ...]  # FLOPs per stage
    memory: tuple[float, ...]  # bytes per stage

    def stage_of(self, unit: int) -> int:
        return max(s for s in range(len(self.bounds) - 1) if self.bounds[s] <= unit)

    @property
    def imbalance(self) -> float:
        """The most expensive stage's time over the cheapest's."""
        return max(self.time) / max(min(self.time), 1e-30)


def partition(costs: UnitCosts, stages: int, schedule: str, microbatches: int, balance: str = "time",
              memory_limit: float | None = None) -> Partition:
    """Contiguous cut of the units into `stages` minimizing the largest stage cost (dynamic
    programming over cut points: exact, and units are few)."""
    n = len(costs.flops)

    def span(values, a, b):
        return sum(values[a:b])

    def stage_memory(s, a, b):
        return span(costs.states, a, b) + span(costs.activations, a, b) * in_flight(schedule, s, stages, microbatches)

    def stage_cost(s, a, b):
        memory = stage_memory(s, a, b)
        if memory_limit is not None and memory > memory_limit:
            return float("inf")
        return span(costs.flops, a, b) if balance == "time" else memory

    # best[s][j]: the smallest largest cost of stages 0..s-1 covering units 0..j-1
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for j in range(s, n + 1):
            for i in range(s - 1, j):
                value = max(best[s - 1][i], stage_cost(s - 1, i, j))
                # ties go to the later cut: earlier stages keep more in flight under 1F1B
                if value < best[s][j] or (value == best[s][j] and value < inf):
                    best[s][j], cut[s][j] = value, i
    if best[stages][n] == inf:
        raise PipelineError(f"no cut of the {n} blocks into {stages} stages fits memory_limit={memory_limit:.4g} "
                            f"bytes per stage; raise the limit, add stages, or add insert-remat before pp")
    bounds = [n]
    for s in range(stages, 0, -1):
        bounds.append(cut[s][bounds[-1]])
    bounds = tuple(reversed(bounds))
    time = tuple(span(costs.flops, bounds[s], bounds[s + 1]) for s in range(stages))
    memory = tuple(stage_memory(s, bounds[s], bounds[s + 1]) for s in range(stages))
    return Partition(bounds, time, memory)


# ------------------------------------------------------------------ markers


def insert_markers(gm: fx.GraphModule, stage_of: dict[fx.Node, int]) -> int:
    """A chain of bmc::pipe markers on every value used by a later stage than its own; each
    user reads the marker of its own stage. Returns how many markers were inserted."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    last = max(stage_of.values())

    def stage_at(user: fx.Node) -> int | None:
        return last if user.op == "output" else stage_of.get(user)

    inserted = 0
    for node in list(gm.graph.nodes):
        own = 0 if node.op == "placeholder" else stage_of.get(node)
        if own is None or not isinstance(node.meta.get("val"), torch.Tensor):
            continue  # sizes are read off the tensors a stage receives (backends/pipeline.py)
        user_stage = {u: stage_at(u) for u in node.users if (stage_at(u) or 0) > own}
        if not user_stage:
            continue
        later = list(user_stage)
        chain = {own: node}
        for stage in range(own + 1, max(user_stage.values()) + 1):
            first = min((u for u in later if user_stage[u] >= stage), key=order.__getitem__)
            with gm.graph.inserting_before(first):
                marker = gm.graph.call_function(PIPE, (chain[stage - 1], stage))
            ir.copy_meta(node, marker, "pp")
            ir.annotate(marker, ir.Stage(stage))
            stage_of[marker] = stage
            chain[stage] = marker
            inserted += 1
        for user, stage in user_stage.items():
            user.replace_input_with(node, chain[stage])
    return inserted


# ------------------------------------------------------------------ the pass


ZERO3 = ("pp with zero{stage=3} is not supported yet (ZeRO-3 gathers inside pipelined stages); "
         "use zero{stage=1} or zero{stage=2} with pp")
# each stage would decide alone whether its gradients overflowed and skip the step
FP16 = ("pp with amp{dtype=fp16} is not supported yet (loss-scale overflow is not agreed across stages); "
        "use amp{dtype=bf16}, which needs no loss scaling")


@register_pass("pp", options=PpOptions, provides=("staged",), invalidates=("cost",),
               forbids=("staged", ("zero3", ZERO3), ("loss-scaling", FP16)))
class PipelineParallel(Pass):
    """Pipeline parallelism: stages cut at block boundaries, balanced by the cost model."""

    def run(self, gm: fx.GraphModule) -> PassResult:
        opts = self.options
        units, count = node_units(gm)
        total = opts.total_stages
        if total > count:
            raise PipelineError(f"pp{{stages={opts.stages}}} with {opts.stages_per_rank} stage(s) per rank needs "
                                f"{total} blocks to cut between, but the model has {count}; use at most "
                                f"{count // opts.stages_per_rank} stages")
        costs = unit_costs(gm, units, count)
        plan = partition(costs, total, opts.schedule, opts.num_microbatches, opts.balance, opts.memory_limit)
        stage_of = {node: plan.stage_of(unit) for node, unit in units.items()}
        for node, stage in stage_of.items():
            ir.annotate(node, ir.Stage(stage))
        markers = insert_markers(gm, stage_of) if total > 1 else 0
        reorder_by_stage(gm, stage_of)
        ir.set_plan(gm, ir.PipelinePlan(opts.stages, total, opts.schedule, opts.num_microbatches, tuple(plan.bounds),
                                        tuple(float(t) for t in plan.time), tuple(float(m) for m in plan.memory)))
        gm.graph.lint()
        gm.recompile()
        for s in range(total):
            log.info("pp stage %d: blocks %d-%d, %.3g FLOPs, %.3g bytes", s, plan.bounds[s], plan.bounds[s + 1] - 1,
                     plan.time[s], plan.memory[s])
        return PassResult(gm, True, {"stages": total, "markers": markers,
                                     "blocks-per-stage": [plan.bounds[s + 1] - plan.bounds[s] for s in range(total)],
                                     "imbalance": round(plan.imbalance, 4)})


for _stages in (2, 4, 8):
    register_preset(f"pp{_stages}", f"pp{{stages={_stages}}}", f"pipeline parallelism over {_stages} stages (1F1B)")
