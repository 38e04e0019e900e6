"""The torch backend: the transformed graph runs as an ordinary torch module.

At world size 1 it simply runs (training and inference): the graph is export's training IR,
so autograd differentiates it like the original model. At world size N it runs under
torch.distributed (gloo on CPU, NCCL on GPU) with a DeviceMesh; the dp and zero passes'
annotations are carried out by the data-parallel runtime (backends/data_parallel.py)."""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.fx as fx

from bmc import ir
from bmc.ir import ops
from bmc.plugins import register_backend
from bmc.backends.data_parallel import DataParallelRuntime
from bmc.backends.optimizer import ProgramOptimizer
from bmc.backends.pipeline import PipelineRuntime, RankStages
from bmc.backends.regather import GatherTracker
from bmc.errors import BackendError
from bmc.ir.serialize import save_pt2
from bmc.passmgr.manager import PassContext
from bmc.program import Program


def _check_weights(gm: fx.GraphModule) -> None:
    if any(t.device.type == "meta" for t in (*gm.parameters(), *gm.buffers())):
        raise BackendError("the model's weights are on the meta device, so it can be planned but not run; "
                           "build it on cpu (or load real weights) to run it")


def _is_data_parallel(gm: fx.GraphModule) -> bool:
    return any(ir.get(n, ir.Zero) is not None for n in gm.graph.find_nodes(op="get_attr"))


def _device_mesh(world_size: int, tp: int, pp: int = 1):
    """The (dp, tp) mesh, or (pp, dp, tp) with pipeline stages: tp ranks are neighbours (they
    talk most), dp spans the rest within a stage, pp is outermost (it talks least)."""
    from torch.distributed.device_mesh import init_device_mesh
    device = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
    if pp > 1:
        return init_device_mesh(device, (pp, world_size // (pp * tp), tp), mesh_dim_names=("pp", "dp", "tp"))
    return init_device_mesh(device, (world_size // tp, tp), mesh_dim_names=("dp", "tp"))


def _tp_degree(gm: fx.GraphModule) -> int:
    plan = ir.get_plan(gm, ir.TensorParallelPlan)
    return plan.degree if plan else 1


def _pp_degree(gm: fx.GraphModule) -> int:
    plan = ir.get_plan(gm, ir.PipelinePlan)
    return plan.stages if plan else 1


def check_mesh(world: int, tp: int, pp: int) -> None:
    """The plan's tp x pp must fit the world size (the rest is data parallel)."""
    split = tp * pp
    what = " x ".join(f"{name}={n}" for name, n in (("tp", tp), ("pp", pp)) if n > 1) or "one rank"
    if world < split:
        raise BackendError(f"the plan spans {what} = {split} ranks but is compiled for world size {world}: "
                           f"compile with world_size={split} (or a multiple) and launch with torchrun")
    if world % split:
        raise BackendError(f"the plan spans {what} = {split} ranks, which does not divide world size "
                           f"{world}; compile with a world size that is a multiple of {split}")


def own_weights(gm: fx.GraphModule, tp_rank: int = 0) -> None:
    """Give the program weights of its own: a copy of every parameter and buffer (training it
    never writes to the model it was compiled from), and of each weight the tp plan splits
    only this rank's slice (the whole weight is dropped)."""
    plan = ir.get_plan(gm, ir.TensorParallelPlan)
    layouts = {layout.param: layout for layout in plan.layouts} if plan else {}
    tensors = dict(gm.named_parameters(remove_duplicate=False))
    tensors.update(gm.named_buffers(remove_duplicate=False))
    done: set[int] = set()
    with torch.no_grad():
        for name in sorted(tensors, key=lambda n: n not in layouts):  # a split name first, for tied weights
            tensor = tensors[name]
            if id(tensor) in done:
                continue
            done.add(id(tensor))
            data = tensor.detach()
            data = layouts[name].local(data, tp_rank, plan.degree) if name in layouts else data
            data = data.clone()
            new = torch.nn.Parameter(data, requires_grad=tensor.requires_grad) \
                if isinstance(tensor, torch.nn.Parameter) else data
            ir.replace_tensor(gm, tensor, new)


@register_backend("torch", implies=(("tp-split", "tp-collectives",
                                     "the graph is split by tp but has no collectives: add insert-collectives after tp "
                                     "(the preset tp2 is tp{degree=2},insert-collectives)"),))
def lower(gm: fx.GraphModule, context: PassContext, **options) -> Program:
    if options:
        raise BackendError(f"the torch backend takes no options, got {', '.join(sorted(options))}")
    _check_weights(gm)
    world, tp, pp = context.world_size, _tp_degree(gm), _pp_degree(gm)
    if tp > 1 and ir.get_plan(gm, ir.TensorParallelPlan).collectives is None:
        raise BackendError("the graph is split by tp but has no collectives: add insert-collectives after tp "
                           f"(the preset tp{tp} is tp{{degree={tp}}},insert-collectives)")
    check_mesh(world, tp, pp)
    if world == 1:
        own_weights(gm)
        ops.register_group("dp", 1)
        return TorchProgram(gm, backend="torch", context=context)
    if not dist.is_initialized():
        raise BackendError(f"world size {world} needs torch.distributed: launch the script with "
                           f"torchrun --nproc-per-node={world} (or call init_process_group first)")
    if dist.get_world_size() != world:
        raise BackendError(f"the plan is for world size {world} but torch.distributed runs "
                           f"{dist.get_world_size()} processes; compile with world_size={dist.get_world_size()}")
    dp = world // (tp * pp)
    if dp > 1 and not _is_data_parallel(gm):
        raise BackendError(f"world size {world} with tp={tp}, pp={pp} leaves {dp} data-parallel replicas, but the "
                           f"pipeline distributes nothing over them: add dp or zero{{stage=N}}")
    mesh = _device_mesh(world, tp, pp)
    ops.register_group("tp", tp, mesh.get_group("tp"))
    own_weights(gm, mesh.get_local_rank("tp") if tp > 1 else 0)
    pipeline = PipelineRuntime(gm, mesh) if pp > 1 else None
    runtime = None
    if dp > 1:
        pg = mesh.get_group("dp")
        ops.register_group("dp", dp, pg)
        data = ir.get_plan(gm, ir.DataParallelPlan)
        runtime = DataParallelRuntime(gm, pg, bucket_mb=data.bucket_mb if data else 25.0,
                                      prefetch=data.prefetch if data else 0,
                                      modules=pipeline.modules if pipeline else None)
    else:
        ops.register_group("dp", 1)
    if pipeline is not None:
        return PipelineProgram(gm, runtime, pipeline, context=context, mesh=mesh)
    return DistributedProgram(gm, runtime, context=context, mesh=mesh)


class TorchProgram(Program):
    """A program on one process: the graph module runs as it is."""

    def optimizer(self, optimizer_cls, **kwargs):
        """`optimizer_cls` over this program's trainable parameters, with the fp32 masters,
        loss scaling and offload its passes asked for (backends/optimizer.py)."""
        return ProgramOptimizer(self.graph_module, optimizer_cls, None, **kwargs)


class DistributedProgram(TorchProgram):
    """A program whose parameters and optimizer states are laid out by the data-parallel plan."""

    def __init__(self, gm: fx.GraphModule, runtime: DataParallelRuntime | None, *, context: PassContext, mesh):
        super().__init__(gm, backend="torch", context=context)
        self.runtime = runtime
        self.mesh = mesh
        self.gathers = None
        if runtime is not None and any(e.stage == 3 for e in runtime.entries):
            self.gathers = GatherTracker(runtime.prefetcher.in_flight_bytes if runtime.prefetcher else (lambda: 0))

    def __call__(self, *args, **kwargs):
        if self.gathers is None:
            return self.graph_module(*args, **kwargs)
        # backward unpacks saved tensors outside this call: the watcher stays registered
        # through the tracker's hooks only for forward; unpack re-gathers by itself
        with self.gathers.active(), self._prefetching():
            return self.graph_module(*args, **kwargs)

    @contextlib.contextmanager
    def _prefetching(self):
        """Backward's re-gathers and gradients come after this call returns, so the prefetcher
        and the gradient reducer stay installed until another program runs."""
        prefetcher = self.runtime.prefetcher
        ops.PREFETCHER = prefetcher
        ops.GRAD_REDUCER = self.runtime.reduce_gathered_gradient
        if prefetcher is not None:
            prefetcher.begin("forward")
        try:
            yield
        finally:
            if prefetcher is not None:
                prefetcher.begin("backward")  # what gathers next is backward's (or recompute's)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        full = super().full_state_dict()
        self._gather_tp(full)
        for entry in (self.runtime.entries if self.runtime is not None else ()):
            if entry.stage == 3:
                gathered = torch.ops.bmc.gather_param(entry.param.detach(), list(entry.shape), "dp")
                for name, p in self.graph_module.named_parameters(remove_duplicate=False):
                    if p is entry.param:
                        full[name] = gathered.clone()
        return full

    def _gather_tp(self, full: dict[str, torch.Tensor]) -> None:
        plan = ir.get_plan(self.graph_module, ir.TensorParallelPlan)
        if plan is None:
            return
        group = self.mesh.get_group("tp")
        by_param = {}
        for name, p in self.graph_module.named_parameters(remove_duplicate=False):
            by_param.setdefault(id(p), []).append(name)
        for layout in plan.layouts:
            name = layout.param
            param = self.graph_module.get_parameter(name)
            local = param.detach().contiguous()
            pieces = [torch.empty_like(local) for _ in range(plan.degree)]
            dist.all_gather(pieces, local, group=group)
            for alias in by_param.get(id(param), [name]):  # a tied weight under each of its names
                full[alias] = layout.full(pieces)

    def optimizer(self, optimizer_cls, **kwargs):
        return ProgramOptimizer(self.graph_module, optimizer_cls, self.runtime, **kwargs)

    def save_weights(self, directory: str, *, source: str | None = None, provenance: dict | None = None,
                     shard_bytes: int | None = None) -> str:
        """Every rank calls it. No rank gathers the model: each writes what it holds as a
        sharded checkpoint (torch.distributed.checkpoint, any plan), and rank 0 reads that back
        a group at a time (weights.GROUP_BYTES) into the weights directory, so it holds one
        group beside its own part."""
        import shutil
        from pathlib import Path
        from bmc.backends import checkpoint
        from bmc.models import weights
        target = Path(directory)
        work = target.with_name(f".{target.name}.gather")
        step = checkpoint.save(work, self, step=0, keep=1)
        if dist.get_rank() == 0:
            try:
                weights.export_checkpoint(step, target, source=source, shard_bytes=shard_bytes or weights.SHARD_BYTES,
                                          provenance={**self.provenance(), **(provenance or {})},
                                          lineage=self.lineage)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        dist.barrier()
        return directory

    def save(self, path: str) -> None:
        """Every rank calls it: the whole weights are gathered and rank 0 writes the archive,
        which loads on any number of ranks under the same plan."""
        state = self.full_state_dict()
        if dist.get_rank() == 0:
            save_pt2(self.graph_module, path, pipeline=self.pipeline, state=state, lineage=self.lineage)
        dist.barrier()


class PipelineProgram(DistributedProgram):
    """A pipelined program: `step(*inputs)` runs forward and backward of every microbatch
    through the stages (the schedule interleaves them) and returns the step's loss on every
    rank; gradients are then where the optimizer reads them. `prog(*inputs)` runs forward
    only and returns the loss (or the last stage's outputs there, None elsewhere)."""

    def __init__(self, gm, runtime, pipeline: PipelineRuntime, *, context, mesh):
        super().__init__(gm, runtime, context=context, mesh=mesh)
        self.pipe = pipeline
        self.stages = RankStages(gm, pipeline.modules, pipeline.tied_duplicates())

    def step(self, *args, target=None, loss_fn=None, **kwargs) -> torch.Tensor:
        pipeline = self.pipe
        if loss_fn is not None:
            pipeline.use_loss(loss_fn)
        flat = pipeline.flatten(args, kwargs)
        if self.runtime is not None:
            self.runtime.accumulating = True
        try:
            losses = pipeline.run(flat, target, train=True)
        finally:
            if self.runtime is not None:
                self.runtime.accumulating = False
        pipeline.sum_tied_gradients()
        if self.runtime is not None:
            self.runtime.queue_accumulated()
        return pipeline.mean_loss(losses)

    def __call__(self, *args, target=None, loss_fn=None, **kwargs):
        if loss_fn is not None:
            self.pipe.use_loss(loss_fn)
        losses = self.pipe.run(self.pipe.flatten(args, kwargs), target, train=False)
        return self.pipe.mean_loss(losses)

    @property
    def stage_modules(self) -> list[fx.GraphModule]:
        """The stage graphs this rank runs (the schedule calls them; bmc.check records them)."""
        return self.pipe.modules

    def named_parameters(self):
        """This rank's parameters, named as in the whole model."""
        seen = set()
        for module in self.pipe.modules:
            for name, p in module.named_parameters():
                if name not in seen:
                    seen.add(name)
                    yield name, p

    def parameters(self):
        return (p for _, p in self.named_parameters())

    def full_state_dict(self):
        """Every parameter whole, by dotted name, on every rank: each pipeline rank gives the
        weights of its own stages (gathered over tp and ZeRO first)."""
        whole = super().full_state_dict()
        mine = {name: whole[name] for name, _ in self.named_parameters() if name in whole}
        pieces: list = [None] * self.pipe.pp_size
        dist.all_gather_object(pieces, mine, group=self.pipe.pp_group)
        for piece in pieces:
            whole.update(piece)
        return whole

    def optimizer(self, optimizer_cls, **kwargs):
        return ProgramOptimizer(self.stages, optimizer_cls, self.runtime, **kwargs)
