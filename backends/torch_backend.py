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

from bmc import ir, ops
from bmc.backends import register_backend
from bmc.backends.data_parallel import DataParallelRuntime
from bmc.backends.optimizer import ProgramOptimizer
from bmc.backends.regather import GatherTracker
from bmc.errors import BackendError
from bmc.passmgr import PassContext
from bmc.program import Program


def _check_weights(gm: fx.GraphModule) -> None:
    if any(t.device.type == "meta" for t in (*gm.parameters(), *gm.buffers())):
        raise BackendError("the model's weights are on the meta device, so it can be planned but not run; "
                           "build it on cpu (or load real weights) to run it")


def _is_data_parallel(gm: fx.GraphModule) -> bool:
    return any(ir.get(n, ir.Zero) is not None for n in gm.graph.find_nodes(op="get_attr"))


def _device_mesh(world_size: int, tp: int):
    """The (dp, tp) mesh: tp ranks are neighbours (they talk most), dp spans the rest."""
    from torch.distributed.device_mesh import init_device_mesh
    device = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device, (world_size // tp, tp), mesh_dim_names=("dp", "tp"))


def _tp_degree(gm: fx.GraphModule) -> int:
    plan = gm.meta.get("bmc.tp")
    return plan["degree"] if plan else 1


def _install_tp_slices(gm: fx.GraphModule, rank: int) -> None:
    """This tp rank's slice of every split weight (the pass left rank 0's on the module)."""
    plan = gm.meta["bmc.tp"]
    with torch.no_grad():
        for name, layout in plan["layouts"].items():
            gm.get_parameter(name).copy_(layout.local(plan["full"][name], rank, plan["degree"]))


@register_backend("torch")
def lower(gm: fx.GraphModule, context: PassContext, **options) -> Program:
    if options:
        raise BackendError(f"the torch backend takes no options, got {', '.join(sorted(options))}")
    _check_weights(gm)
    world, tp = context.world_size, _tp_degree(gm)
    if world < tp:
        raise BackendError(f"the plan splits tensors over tp={tp} ranks but is compiled for world size {world}: "
                           f"compile with world_size={tp} (or a multiple) and launch with torchrun")
    if world % tp:
        raise BackendError(f"the plan splits tensors over tp={tp} ranks, which does not divide world size "
                           f"{world}; compile with a world size that is a multiple of {tp}")
    if world == 1:
        ops.register_group("dp", 1)
        return Program(gm, backend="torch", context=context)
    if not dist.is_initialized():
        raise BackendError(f"world size {world} needs torch.distributed: launch the script with "
                           f"torchrun --nproc-per-node={world} (or call init_process_group first)")
    if dist.get_world_size() != world:
        raise BackendError(f"the plan is for world size {world} but torch.distributed runs "
                           f"{dist.get_world_size()} processes; compile with world_size={dist.get_world_size()}")
    dp = world // tp
    if dp > 1 and not _is_data_parallel(gm):
        raise BackendError(f"world size {world} with tp={tp} leaves {dp} data-parallel replicas, but the pipeline "
                           f"distributes nothing over them: add dp or zero{{stage=N}}")
    mesh = _device_mesh(world, tp)
    ops.register_group("tp", tp, mesh.get_group("tp"))
    if tp > 1:
        _install_tp_slices(gm, mesh.get_local_rank("tp"))
    runtime = None
    if dp > 1:
        pg = mesh.get_group("dp")
        ops.register_group("dp", dp, pg)
        runtime = DataParallelRuntime(gm, pg, bucket_mb=gm.meta.get("bmc.bucket_mb", 25.0),
                                      prefetch=gm.meta.get("bmc.prefetch", 0))
    else:
        ops.register_group("dp", 1)
    return DistributedProgram(gm, runtime, context=context, mesh=mesh)


class DistributedProgram(Program):
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
        plan = self.graph_module.meta.get("bmc.tp")
        if not plan:
            return
        group = self.mesh.get_group("tp")
        for name, layout in plan["layouts"].items():
            local = self.graph_module.get_parameter(name).detach().contiguous()
            pieces = [torch.empty_like(local) for _ in range(plan["degree"])]
            dist.all_gather(pieces, local, group=group)
            full[name] = layout.full(pieces)

    def optimizer(self, optimizer_cls, **kwargs):
        return ProgramOptimizer(self.graph_module, optimizer_cls, self.runtime, **kwargs)
