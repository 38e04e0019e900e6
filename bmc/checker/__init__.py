"""`bmc.check`: is the transformed model still the same model, and if not, where does it go wrong?

    report = bmc.check(model, "tp2", world_size=2)       # 2 local gloo ranks
    report.passed, str(report)                           # the verdict; per output, gradients, first wrong node

The original is traced and run node by node on seeded batches; the pipeline's program runs
the same batches (a distributed one on local gloo ranks, loaded from a .pt2 archive as another
process would load it; every rank's values put back together from their placements, ZeRO-2/3's
gradient slices joined, a pipeline's stages each recorded on the rank that runs them). Outputs
and parameter gradients are held to the contract the passes declare (bmc/passmgr/
equivalence.py). On a mismatch it names the first node, in graph order, whose value is off,
and the pass that made it; where every value is right and a gradient is not, the first node
(from the output back) whose gradient is off. Each node's value is kept while a batch runs:
check small models, or small batches of big ones.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import tempfile
from typing import Any, Sequence

import torch
import torch.fx as fx

from bmc import ir
from bmc.checker.report import CheckReport, Error, error, first_divergence, worst
from bmc.checker.values import NAME_KEY, Run, call_recording, merge_ranks, probe_loss
from bmc.errors import BmcError
from bmc.passmgr.equivalence import EXACT
from bmc.ir.trace import normalize_example_inputs

log = logging.getLogger(__name__)

__all__ = ["check", "CheckReport"]


def check(original: torch.nn.Module, passes: str | Sequence[str], example_inputs: Any = None, *,
          world_size: int = 1, batches: Sequence[Any] | None = None, seed: int = 0, calibration: Any = None,
          dynamic: Any = None, gradients: bool = True) -> CheckReport:
    """Compile `passes` for `world_size` ranks and check the program against `original` on
    `batches` (default: the example and a batch of other token ids drawn from `seed`).
    Distributed programs run on `world_size` local gloo processes."""
    from bmc.passmgr import PassContext, PassManager
    if not isinstance(original, torch.nn.Module):
        raise BmcError(f"bmc.check takes the original nn.Module, got {type(original).__name__}")
    example_inputs = example_inputs if example_inputs is not None else _own_example(original)
    reference = ir_copy(original, example_inputs, dynamic)
    context = PassContext(world_size=world_size, calibration=list(calibration) if calibration is not None else None)
    manager = PassManager(list(passes) if not isinstance(passes, str) else passes, context=context)
    transformed = manager.run(copy.deepcopy(reference)).graph_module
    return compare(reference, transformed, manager.equivalence(), str(manager.pipeline), world_size=world_size,
                   batches=batches, seed=seed, gradients=gradients)


def compare(reference: fx.GraphModule, transformed: fx.GraphModule, contract, pipeline: str, *,
            world_size: int = 1, batches: Sequence[Any] | None = None, seed: int = 0,
            gradients: bool = True) -> CheckReport:
    """Check a graph the pipeline made (`transformed`, planned for `world_size` ranks) against
    the graph it was made from, held to `contract` (PassManager.equivalence()). `batches`
    default to the traced example and other token ids drawn from `seed`."""
    from bmc.passmgr import PassContext
    if any(t.device.type == "meta" for t in (*reference.parameters(), *reference.buffers())):
        raise BmcError("the model's weights are on the meta device: build it on cpu (or load real weights) to check it")
    batches = list(batches) if batches is not None else _default_batches(reference, seed)
    context = PassContext(world_size=world_size)
    ref_runs = [_reference_run(reference, b, seed + i, gradients) for i, b in enumerate(batches)]
    got_runs, where = _program_runs(transformed, context, pipeline, batches, seed, gradients)
    return _report(reference, transformed, ref_runs, got_runs, contract, pipeline, where, gradients)


def compare_build(reference: fx.GraphModule, directory: str, contract, pipeline: str, *,
                  batches: Sequence[Any] | None = None, seed: int = 0) -> CheckReport:
    """Check an ort-paged build (`directory`) against the graph its pipeline started from:
    whole-sequence logits (or an encoder's hidden states) from ONNX Runtime beside the
    original's, on the traced example's token ids and others drawn from `seed`, held to the
    pipeline's contract (ONNX Runtime's kernels reassociate sums as tp does). Outputs only:
    ONNX Runtime's intermediate values are not the graph's nodes."""
    import bmc
    batches = list(batches) if batches is not None else _default_batches(reference, seed)
    program = bmc.load(directory)
    report = CheckReport(pipeline, contract, f"ONNX Runtime (the ort-paged build in {directory})", len(batches))
    for batch in batches:
        args, kwargs = normalize_example_inputs(batch)
        ids = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dtype == torch.long]
        if len(ids) != 1:
            raise BmcError("checking an ort-paged build needs a model traced with token ids alone (its example "
                           f"holds {len(ids)} integer tensors)")
        with torch.no_grad():
            want = torch.utils._pytree.tree_leaves(reference(*args, **kwargs))[0].detach()
        got = program(ids[0])
        err = error(want, got) or Error(float("inf"), float("inf"))
        previous = report.outputs[0][1] if report.outputs else Error(0.0, 0.0)
        report.outputs = [(tuple(want.shape), worst([previous, err]))]
    return report


def _default_batches(reference: fx.GraphModule, seed: int) -> list:
    """The example the graph was traced with, and the same structure with other values."""
    from bmc.ir.trace import trace_info
    info = trace_info(reference)
    example = (info.args, info.kwargs)
    return [example, redraw(example, seed)]


def _own_example(model: torch.nn.Module):
    if hasattr(model, "example_inputs"):
        return model.example_inputs()
    raise BmcError("the model has no example_inputs(): pass example_inputs=(tensor, ...) to bmc.check")


def ir_copy(original: torch.nn.Module, example_inputs: Any, dynamic: Any) -> fx.GraphModule:
    """The original traced from a copy of the model: running it for gradients never touches
    the user's parameters or their .grad."""
    from bmc.ir.trace import trace
    return trace(copy.deepcopy(original), example_inputs, dynamic=dynamic)


def redraw(example_inputs: Any, seed: int) -> Any:
    """The example's structure with other values: token ids drawn below the example's largest
    id + 1 (or the vocabulary the model says), floats from a normal distribution; masks and
    other integer tensors kept."""
    args, kwargs = normalize_example_inputs(example_inputs)
    gen = torch.Generator().manual_seed(seed + 1000)
    ids = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dtype == torch.long]
    high = max((int(t.max()) + 1 for t in ids if t.numel()), default=2)
    first = next(iter((*args, *kwargs.values())), None)  # the token ids; later integer inputs are kept

    def other(t):
        if not isinstance(t, torch.Tensor):
            return t
        if t is first and t.dtype == torch.long and t.dim() == 2:
            return torch.randint(0, max(high, 2), t.shape, generator=gen)
        if t.is_floating_point():
            return torch.randn(t.shape, generator=gen, dtype=t.dtype)
        return t

    return tuple(other(a) for a in args), {k: other(v) for k, v in kwargs.items()}


def _reference_run(gm: fx.GraphModule, batch: Any, seed: int, gradients: bool) -> Run:
    args, kwargs = normalize_example_inputs(batch)
    gm.zero_grad(set_to_none=True)
    with torch.enable_grad():
        run, out = call_recording(gm, gm, args, kwargs, grads=gradients)
        loss = probe_loss(out, seed) if gradients else None
        if loss is not None:
            loss.backward()
    run.param_grads = _param_grads(gm)
    return run


def _param_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in module.named_parameters(remove_duplicate=False)
            if p.grad is not None}


# ------------------------------------------------------------------ the program's side


def _program_runs(transformed: fx.GraphModule, context, pipeline: str, batches, seed: int, gradients: bool):
    from bmc.plugins import get_backend
    if context.world_size == 1:
        context.settings = {**context.settings, "pipeline": pipeline}
        program = get_backend("torch").lower(copy.deepcopy(transformed), context)
        return [_program_run(program, b, seed + i, gradients) for i, b in enumerate(batches)], "1 process"
    from bmc.checker.ranks import run_on_ranks
    from bmc.ir.serialize import save_pt2
    with tempfile.TemporaryDirectory(prefix="bmc-check-") as tmp:
        with _names_kept(transformed):
            save_pt2(transformed, os.path.join(tmp, "program.pt2"), pipeline=pipeline)
        torch.save(list(batches), os.path.join(tmp, "batches.pt"))
        torch.save({"seed": seed, "gradients": gradients}, os.path.join(tmp, "options.pt"))
        per_rank = run_on_ranks(tmp, context.world_size)
    runs = [_merged_run(transformed, [_as_run(r["runs"][i]) for r in per_rank], per_rank)
            for i in range(len(batches))]
    return runs, f"{context.world_size} gloo ranks" + _mesh_text(transformed)


def _merged_run(transformed: fx.GraphModule, runs: list[Run], per_rank: list[dict]) -> Run:
    """One Run for the whole model from every rank's (in `per_rank`'s order): ZeRO-2/3's
    gradient slices joined over the data-parallel ranks, each pipeline stage's values and
    gradients taken from the rank that ran it, the tensor-parallel pieces put together."""
    def at(r: dict) -> tuple[int, int]:
        return r["tp_rank"], r["pp_rank"]

    by_tp, local_grads = [], []
    for tp_rank in sorted({r["tp_rank"] for r in per_rank}):
        stages = []
        for place in sorted({at(r) for r in per_rank if r["tp_rank"] == tp_rank}):
            replicas = sorted((r["dp_rank"], i) for i, r in enumerate(per_rank) if at(r) == place)
            group = [runs[i] for _, i in replicas]
            group[0].param_grads.update(whole_from_shards(group))
            stages.append(group[0])
            local_grads.append((tp_rank, group[0].param_grads))
        by_tp.append(_union(stages))
    merged = merge_ranks(transformed, by_tp)
    merged.param_grads = by_tp[0].param_grads
    merged.local_param_grads = local_grads
    return merged


def whole_from_shards(replicas: list[Run]) -> dict[str, torch.Tensor]:
    """ZeRO-2/3 gradients, which each data-parallel rank holds a flat slice of (zero-padded at
    the end), put back together from the replicas' Runs in dp rank order."""
    whole = {}
    for name, (_, shape) in replicas[0].shard_grads.items():
        flat = torch.cat([r.shard_grads[name][0] for r in replicas])
        whole[name] = flat[:math.prod(shape)].view(shape)
    return whole


def _union(stages: list[Run]) -> Run:
    """The values and gradients of every pipeline stage as one Run (a value every stage
    recomputes, a RoPE table, is the same in each)."""
    if len(stages) == 1:
        return stages[0]
    union = Run(outputs=stages[-1].outputs)
    for run in stages:
        union.values.update(run.values)
        union.grads.update(run.grads)
        union.param_grads.update(run.param_grads)  # each stage's copy is compared on its own too
    return union


def _mesh_text(gm: fx.GraphModule) -> str:
    pp = ir.get_plan(gm, ir.PipelinePlan)
    parts = [f"tp={_tp_degree(gm)}"] if _tp_degree(gm) > 1 else []
    parts += [f"pp={pp.stages}, {pp.microbatches} microbatches"] if pp is not None else []
    return f" ({', '.join(parts)})" if parts else ""


@contextlib.contextmanager
def _names_kept(gm: fx.GraphModule):
    """Each computing node's name in its custom meta while the archive is written: re-export
    names the nodes a pass inserted afresh (a `mul_20` becomes `mul_11`), so a rank's values
    are recorded under the names the check compares."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    for node in nodes:
        node.meta.setdefault("custom", {})[NAME_KEY] = node.name
    try:
        yield
    finally:
        for node in nodes:
            node.meta.get("custom", {}).pop(NAME_KEY, None)


def _tp_degree(gm: fx.GraphModule) -> int:
    plan = ir.get_plan(gm, ir.TensorParallelPlan)
    return plan.degree if plan else 1


def _program_run(program, batch: Any, seed: int, gradients: bool) -> Run:
    args, kwargs = normalize_example_inputs(batch)
    runtime = getattr(program, "runtime", None)
    _clear_gradients(program, runtime)
    pp = ir.get_plan(program.graph_module, ir.PipelinePlan)
    with torch.enable_grad():
        if pp is not None:
            run = _pipelined_run(program, pp.microbatches, args, kwargs, seed, gradients)
        else:
            run, out = call_recording(program.graph_module, program, args, kwargs, grads=gradients)
            loss = probe_loss(out, seed) if gradients else None
            if loss is not None:
                loss.backward()
    if runtime is not None and gradients:
        runtime.finish_gradient_sync()  # the reduction over data-parallel ranks is checked too
        run.shard_grads = _shard_grads(program.graph_module, runtime)
    run.param_grads = {name: g for name, g in _param_grads(program.graph_module).items()
                       if name not in run.shard_grads}
    scale = _loss_scale(program.graph_module)
    if scale != 1.0:  # fp16 amp scales the loss; its optimizer unscales the gradients before stepping
        for table in (run.param_grads, run.grads):
            for name in table:
                table[name] = table[name].double() / scale
        run.shard_grads = {name: (g.double() / scale, shape) for name, (g, shape) in run.shard_grads.items()}
    return run


def _clear_gradients(program, runtime) -> None:
    for p in program.graph_module.parameters():
        p.grad = None
    if runtime is not None:
        runtime.clear_gradients()


def _pipelined_run(program, microbatches: int, args: tuple, kwargs: dict, seed: int, gradients: bool) -> Run:
    """pp: one schedule step on the batch repeated once per microbatch, so that every
    microbatch is the batch the original ran: each stage's values and the gradients flowing
    into them are the original's, and the parameter gradients (the schedule averages them
    over microbatches) too. The loss is the probe's on the last stage's outputs."""
    def repeated(t):
        return torch.cat([t] * microbatches) if isinstance(t, torch.Tensor) and t.dim() > 0 else t

    args, kwargs = tuple(repeated(a) for a in args), {k: repeated(v) for k, v in kwargs.items()}
    rows = next((t.shape[0] for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim() > 0), 1)

    def step(*a, **k):
        return program.step(*a, target=torch.zeros(rows), loss_fn=lambda out, _: probe_loss(out, seed), **k)

    run, _ = call_recording(program.graph_module, step, args, kwargs, grads=gradients,
                            stages=program.stage_modules)
    return run


def _shard_grads(gm: fx.GraphModule, runtime) -> dict[str, tuple[torch.Tensor, tuple[int, ...]]]:
    """ZeRO-2/3: the slice of each averaged gradient this rank owns, under every name of its
    weight (a tied one has several), with the whole gradient's shape."""
    names: dict[int, list[str]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    shards = {}
    for entry in runtime.entries:
        grad = runtime.sharded_gradient(entry)
        if grad is None:
            continue
        for name in names.get(id(entry.param), [entry.name]):
            shards[name] = (grad.detach().clone(), tuple(entry.shape))
    return shards


def _loss_scale(gm: fx.GraphModule) -> float:
    plan = ir.get_plan(gm, ir.AmpPlan)
    if plan is None or plan.scale_buffer is None:
        return 1.0
    return float(gm.get_buffer(plan.scale_buffer))


def rank_record(path: str, batches, *, seed: int, gradients: bool) -> dict:
    """On one gloo rank (bmc/checker/ranks.py): load the program as a separate process would,
    run every batch, return what it recorded and where this rank sits in the mesh."""
    import bmc
    program = bmc.load(path)
    mesh = getattr(program, "mesh", None)
    names = mesh.mesh_dim_names if mesh is not None else ()
    runs = [_program_run(program, b, seed + i, gradients) for i, b in enumerate(batches)]
    place = {dim: mesh.get_local_rank(dim) if dim in names else 0 for dim in ("tp", "dp", "pp")}
    return {"tp_rank": place["tp"], "dp_rank": place["dp"], "pp_rank": place["pp"],
            "runs": [{"outputs": r.outputs, "values": r.values, "grads": r.grads, "param_grads": r.param_grads,
                      "shard_grads": r.shard_grads} for r in runs]}


def _as_run(d: dict) -> Run:
    return Run(d["outputs"], d["values"], d["grads"], d["param_grads"], shard_grads=d["shard_grads"])


# ------------------------------------------------------------------ the report


def _report(reference, transformed, ref_runs, got_runs, contract, pipeline, where, gradients) -> CheckReport:
    report = CheckReport(pipeline, contract, where, len(ref_runs))
    for ref, got in zip(ref_runs, got_runs):
        if len(ref.outputs) != len(got.outputs):
            raise BmcError(f"the program returns {len(got.outputs)} tensors, the original {len(ref.outputs)}")
        for i, (r, g) in enumerate(zip(ref.outputs, got.outputs)):
            err = error(r, g) or Error(float("inf"), float("inf"))
            if i < len(report.outputs):
                report.outputs[i] = (tuple(r.shape), worst([report.outputs[i][1], err]))
            else:
                report.outputs.append((tuple(r.shape), err))
    if gradients:
        _compare_param_grads(report, transformed, ref_runs, got_runs)
    _locate(report, reference, transformed, ref_runs, got_runs)
    return report


def _compare_param_grads(report: CheckReport, transformed, ref_runs, got_runs) -> None:
    plan = ir.get_plan(transformed, ir.TensorParallelPlan)
    errors: dict[str, Error] = {}
    skipped: set[str] = set()
    missing: set[str] = set()
    trainable = {name for name, p in transformed.named_parameters(remove_duplicate=False) if p.requires_grad}
    for ref, got in zip(ref_runs, got_runs):
        locals_ = got.local_param_grads or [(0, got.param_grads)]
        for name, want in ref.param_grads.items():
            layout = plan.layout(name) if plan else None
            for tp_rank, grads in locals_:
                if name not in grads and any(name in g for _, g in locals_):
                    continue  # held by another pipeline stage
                have = grads.get(name)
                if have is None:
                    (missing if name in trainable else skipped).add(name)
                    continue
                expected = layout.local(want, tp_rank, plan.degree) if layout else want
                err = error(expected, have)
                if err is None:
                    skipped.add(name)
                    continue
                errors[name] = worst([errors.get(name, Error(0.0, 0.0)), err])
    if errors:
        name = max(errors, key=lambda n: errors[n].rel)
        report.gradients = (len(errors), name, errors[name])
    report.gradients_skipped = len(skipped - set(errors))
    report.gradients_missing = tuple(sorted(missing))


def _locate(report: CheckReport, reference, transformed, ref_runs, got_runs) -> None:
    """Name the first node off by more than the contract, in the first batch where an output
    or a gradient is off (for a pipeline that changes the function: where it first changes)."""
    bound = report.contract.bound if report.contract.kind != "changes" else EXACT.bound
    distributed = _tp_degree(transformed) > 1
    for ref, got in zip(ref_runs, got_runs):
        compared, div = first_divergence(reference, transformed, ref, got, bound, distributed=distributed)
        report.nodes_compared = max(report.nodes_compared, compared)
        report.nodes_total = max(report.nodes_total, len(ref.values))
        if div is not None:
            report.first_wrong_value = report.first_wrong_value or div
        elif not report.passed and report.first_wrong_gradient is None:
            _, report.first_wrong_gradient = first_divergence(reference, transformed, ref, got, bound,
                                                              gradients=True, distributed=distributed)
