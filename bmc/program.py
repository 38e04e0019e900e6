"""`bmc.compile` and the program object it returns; `bmc.load` for saved programs."""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.fx as fx

from bmc.errors import BmcError
from bmc.passmgr import Instrument, PassContext, PassManager, PassRecord
from bmc.trace import trace, trace_info

log = logging.getLogger(__name__)


class Program:
    """A compiled model: the transformed graph plus what produced it, runnable on its backend.

    `prog(*args, **kwargs)` runs it; `prog.optimizer(torch.optim.AdamW, lr=...)` builds the
    optimizer over the parameters this rank holds."""

    def __init__(self, graph_module: fx.GraphModule, *, backend: str, context: PassContext,
                 pipeline: str = "", records: Sequence[PassRecord] = ()):
        self.graph_module = graph_module
        self.backend = backend
        self.context = context
        self.pipeline = pipeline
        self.records = list(records)

    def __call__(self, *args, **kwargs):
        return self.graph_module(*args, **kwargs)

    @property
    def module(self) -> torch.nn.Module:
        """This rank's module."""
        return self.graph_module

    def parameters(self):
        return self.graph_module.parameters()

    def named_parameters(self):
        return self.graph_module.named_parameters()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter at its full (unsharded) size, by dotted name, on every rank."""
        return {name: p.detach().clone() for name, p in self.graph_module.named_parameters(remove_duplicate=False)}

    def optimizer(self, optimizer_cls: type[torch.optim.Optimizer], **kwargs):
        """`optimizer_cls` over this program's trainable parameters, with the fp32 masters,
        loss scaling and offload its passes asked for (backends/optimizer.py)."""
        from bmc.backends.optimizer import ProgramOptimizer
        return ProgramOptimizer(self.graph_module, optimizer_cls, None, **kwargs)

    def save(self, path: str) -> None:
        """Write the program as a .pt2 archive (bmc.load and bmc-opt read it back)."""
        from bmc.serialize import save_pt2
        save_pt2(self.graph_module, path, pipeline=self.pipeline)

    def __repr__(self) -> str:
        info = trace_info(self.graph_module)
        name = info.model_name if info else "graph"
        return f"Program({name}, backend={self.backend!r}, pipeline={self.pipeline!r})"


def _as_graph(model: Any, example_inputs: Any, dynamic: Any) -> fx.GraphModule:
    if isinstance(model, Program):
        return model.graph_module
    if isinstance(model, fx.GraphModule) and trace_info(model) is not None:
        return model
    if isinstance(model, str):
        from bmc.serialize import load_graph
        return load_graph(model, example_inputs=example_inputs)[0]
    return trace(model, example_inputs, dynamic=dynamic)


def compile(model: Any, passes: str | Sequence[str] = (), example_inputs: Any = None, backend: str = "torch",
            *, world_size: int = 1, dynamic: Any = None, verify: bool = True,
            instruments: Sequence[Instrument] = (), calibration: Any = None, **backend_options) -> Program:
    """Trace `model` (an nn.Module, a traced GraphModule, a Program or a model path), run the
    pipeline `passes` on it, and lower the result with `backend`. `calibration` is an iterable
    of example batches for the passes that score on data (`prune-heads{score=taylor}`)."""
    from bmc.backends import get_backend
    lower = get_backend(backend)  # fail on a bad backend name before tracing
    if world_size < 1:
        raise BmcError(f"world_size must be >= 1, got {world_size}")
    gm = _as_graph(model, example_inputs, dynamic)
    context = PassContext(world_size=world_size, calibration=list(calibration) if calibration is not None else None)
    manager = PassManager(list(passes) if not isinstance(passes, str) else passes, context=context,
                          verify=verify, instruments=instruments)
    if len(manager.pipeline):
        gm = manager.run(gm).graph_module
    context.settings = {**context.settings, "pipeline": str(manager.pipeline)}
    program = lower(gm, context, **backend_options)
    program.pipeline, program.records = str(manager.pipeline), list(manager.records)
    return program


def load(path: str, **options):
    """Read a program written by `Program.save` or `bmc-opt -o`: a .pt2 archive, or a directory
    built by the ort-paged backend (options: budget, prefetch, threads, ... as for serving)."""
    import os
    if os.path.isdir(path):
        from bmc.backends.ort_paged import load as load_paged
        return load_paged(path, **options)
    if options:
        raise BmcError(f"options {sorted(options)} are for ort-paged directories; {path} is a .pt2 archive")
    from bmc.serialize import load_pt2
    gm, meta = load_pt2(path)
    return Program(gm, backend="torch", context=PassContext(), pipeline=meta.get("pipeline", ""))
