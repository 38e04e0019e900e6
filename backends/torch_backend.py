"""The torch backend: the transformed graph runs as an ordinary torch module.

At world size 1 it simply runs (training and inference): the graph is export's training IR,
so autograd differentiates it like the original model. Distributed execution (torchrun, a
DeviceMesh, sharded optimizers) belongs to the training issue and is refused here with a
clear error rather than run wrongly."""
from __future__ import annotations

import torch
import torch.fx as fx

from bmc.backends import register_backend
from bmc.errors import BackendError
from bmc.passmgr import PassContext
from bmc.program import Program


@register_backend("torch")
def lower(gm: fx.GraphModule, context: PassContext, **options) -> Program:
    if options:
        raise BackendError(f"the torch backend takes no options, got {', '.join(sorted(options))}")
    if context.world_size != 1:
        raise BackendError(f"the torch backend runs at world size 1 for now, got {context.world_size}; "
                           f"plan larger runs with `bmc-opt --world-size {context.world_size} --report`")
    if any(t.device.type == "meta" for t in (*gm.parameters(), *gm.buffers())):
        raise BackendError("the model's weights are on the meta device, so it can be planned but not run; "
                           "build it on cpu (or load real weights) to run it")
    return Program(gm, backend="torch", context=context)


def default_optimizer(program: Program, optimizer_cls: type[torch.optim.Optimizer], **kwargs):
    return optimizer_cls([p for p in program.graph_module.parameters() if p.requires_grad], **kwargs)
