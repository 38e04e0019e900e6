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


def _device_mesh(world_size: int):
    """The dp mesh over every rank (tp/pp axes arrive with the parallelism passes)."""
    from torch.distributed.device_mesh import init_device_mesh
    device = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device, (world_size,), mesh_dim_names=("dp",))


@register_backend("torch")
def lower(gm: fx.GraphModule, context: PassContext, **options) -> Program:
    if options:
        raise BackendError(f"the torch backend takes no options, got {', '.join(sorted(options))}")
    _check_weights(gm)
    world = context.world_size
    if world == 1:
        ops.register_group("dp", 1)
        return Program(gm, backend="torch", context=context)
    if not dist.is_initialized():
        raise BackendError(f"world size {world} needs torch.distributed: launch the script with "
                           f"torchrun --nproc-per-node={world} (or call init_process_group first)")
    if dist.get_world_size() != world:
        raise BackendError(f"the plan is for world size {world} but torch.distributed runs "
                           f"{dist.get_world_size()} processes; compile with world_size={dist.get_world_size()}")
    if not _is_data_parallel(gm):
        raise BackendError(f"world size {world} but the pipeline distributes nothing: add dp or zero{{stage=N}}")
    mesh = _device_mesh(world)
    pg = mesh.get_group("dp")
    ops.register_group("dp", world, pg)
    runtime = DataParallelRuntime(gm, pg, bucket_mb=gm.meta.get("bmc.bucket_mb", 25.0),
                                  prefetch=gm.meta.get("bmc.prefetch", 0))
    return DistributedProgram(gm, runtime, context=context, mesh=mesh)


class DistributedProgram(Program):
    """A program whose parameters and optimizer states are laid out by the data-parallel plan."""

    def __init__(self, gm: fx.GraphModule, runtime: DataParallelRuntime, *, context: PassContext, mesh):
        super().__init__(gm, backend="torch", context=context)
        self.runtime = runtime
        self.mesh = mesh
        in_flight = runtime.prefetcher.in_flight_bytes if runtime.prefetcher else (lambda: 0)
        self.gathers = GatherTracker(in_flight) if any(e.stage == 3 for e in runtime.entries) else None

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
        for entry in self.runtime.entries:
            if entry.stage == 3:
                gathered = torch.ops.bmc.gather_param(entry.param.detach(), list(entry.shape), "dp")
                for name, p in self.graph_module.named_parameters(remove_duplicate=False):
                    if p is entry.param:
                        full[name] = gathered.clone()
        return full

    def optimizer(self, optimizer_cls, **kwargs):
        return ProgramOptimizer(self.graph_module, optimizer_cls, self.runtime, **kwargs)
