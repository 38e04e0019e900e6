"""`bmc.compile` and the program object it returns; `bmc.load` for saved programs."""
from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import torch
import torch.fx as fx

from bmc.errors import BmcError
from bmc.plugins import get_backend, load_directory
from bmc.passmgr.manager import Instrument, PassContext, PassManager, PassRecord
from bmc.passmgr.properties import graph_properties
from bmc.ir.trace import trace, trace_info

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
        self.lineage: list[dict] = []  # the recorded steps its weights came from (bmc/models/weights.py)

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

    def save_weights(self, directory: str, *, source: str | None = None, provenance: dict | None = None,
                     shard_bytes: int | None = None) -> str:
        """The model's whole weights as a weights directory (bmc/models/weights.py: safetensors
        shards, written tensor by tensor; `source` a Hugging Face directory whose config and
        tokenizer come along, so the result is an `hf:DIR` that transformers read too), with
        `provenance`, the program's lineage and the checksums in lineage.json. Returns the
        directory."""
        from bmc.models import weights
        entries, read = weights.tensor_entries(self.graph_module.named_parameters(remove_duplicate=False))
        weights.write_weights(directory, entries, read, source=source, shard_bytes=shard_bytes or weights.SHARD_BYTES,
                              provenance={**self.provenance(), **(provenance or {})}, lineage=self.lineage)
        return directory

    def provenance(self) -> dict:
        """What a weights directory records of the program that wrote it."""
        from importlib.metadata import version
        info = trace_info(self.graph_module)
        return {"kind": "weights", "model": info.model_name if info else "graph", "pipeline": self.pipeline,
                "world_size": self.context.world_size, "bmc_version": version("bmc")}

    def optimizer(self, optimizer_cls: type[torch.optim.Optimizer], **kwargs):
        """`optimizer_cls` over this program's trainable parameters, with the fp32 masters,
        loss scaling and offload its passes asked for; backends that train provide it."""
        raise BmcError(f"the {self.backend} backend does not train: compile with backend='torch' to get an optimizer")

    def save(self, path: str) -> None:
        """Write the program as a .pt2 archive (bmc.load and bmc-opt read it back)."""
        from bmc.ir.serialize import save_pt2
        save_pt2(self.graph_module, path, pipeline=self.pipeline, lineage=self.lineage)

    def __repr__(self) -> str:
        info = trace_info(self.graph_module)
        name = info.model_name if info else "graph"
        return f"Program({name}, backend={self.backend!r}, pipeline={self.pipeline!r})"


def _as_graph(model: Any, example_inputs: Any, dynamic: Any, weights: Any = None,
              streamed: bool = False) -> fx.GraphModule:
    """`streamed`: a Hugging Face directory is read block by block as the backend lowers it
    (its weights deferred, in float32: ort-paged builds), never whole."""
    if weights is None and streamed and isinstance(model, str):
        from bmc.models import hf
        if hf.directory_of(model) is not None:
            return hf.load_graph(model, example=example_inputs, dynamic=True if dynamic is None else dynamic,
                                 device="deferred", dtype=torch.float32)
    if weights is not None:
        return _with_weights(model, weights, example_inputs, dynamic)
    if isinstance(model, Program):
        return model.graph_module
    if isinstance(model, fx.GraphModule) and trace_info(model) is not None:
        return model
    if isinstance(model, str):
        from bmc.ir.serialize import load_graph
        return load_graph(model, example_inputs=example_inputs, dynamic=True if dynamic is None else dynamic)[0]
    return trace(model, example_inputs, dynamic=dynamic)


def _with_weights(model: Any, weights: Any, example_inputs: Any, dynamic: Any) -> fx.GraphModule:
    """`model` (an nn.Module, `zoo:NAME` or `hf:DIR`) with `weights` loaded, traced."""
    from bmc.models import weights as weight_files
    if isinstance(model, str) and model.startswith("zoo:"):
        from bmc.models import zoo
        model = zoo.build(model[4:], device="cpu")
    elif isinstance(model, str):
        from bmc.models import hf
        if hf.directory_of(model) is None:
            raise BmcError(f"weights= loads into an nn.Module, zoo:NAME or hf:DIR; {model} carries its own weights")
        return hf.load_graph(model, example=example_inputs, dynamic=True if dynamic is None else dynamic,
                             device="cpu", weights=str(weights))
    elif not isinstance(model, torch.nn.Module) or isinstance(model, fx.GraphModule):
        raise BmcError(f"weights= loads into an nn.Module, zoo:NAME or hf:DIR, not a {type(model).__name__}")
    log.info("weights: %s", weight_files.load_weights(model, weights))
    return trace(model, example_inputs, dynamic=dynamic)


def compile(model: Any, passes: str | Sequence[str] = (), example_inputs: Any = None, backend: str = "torch",
            *, world_size: int | None = None, dynamic: Any = None, verify: bool = True,
            instruments: Sequence[Instrument] = (), calibration: Any = None, weights: Any = None,
            **backend_options) -> Program:
    """Trace `model` (an nn.Module, a traced GraphModule, a Program or a model path: `zoo:NAME`,
    `hf:DIR` for a Hugging Face checkpoint directory, a .pt2 archive), run the
    pipeline `passes` on it, and lower the result with `backend`. `world_size` defaults to the
    initialized process group's size (1 without one); `calibration` is an iterable of example
    batches for the passes that score on data (`prune-heads{score=taylor}`); `weights` (a
    weights directory, a safetensors file, a training checkpoint or run directory) are loaded
    into an nn.Module, `zoo:NAME` or `hf:DIR` model first."""
    target = get_backend(backend)  # fail on a bad backend name before tracing
    world_size = resolve_world_size(world_size)
    gm = _as_graph(model, example_inputs, dynamic, weights, streamed=backend == "ort-paged")
    lineage = lineage_of_source(model, weights)
    context = PassContext(world_size=world_size, calibration=list(calibration) if calibration is not None else None)
    if isinstance(passes, str) and not passes.strip():
        passes = ()  # "" from Python means no passes, as () does
    manager = PassManager(list(passes) if not isinstance(passes, str) else passes, context=context,
                          verify=verify, instruments=instruments)
    if len(manager.pipeline):
        gm = manager.run(gm, backend=target).graph_module
    else:
        manager.check(graph_properties(gm, calibration is not None), backend=target)
    context.settings = {**context.settings, "pipeline": str(manager.pipeline), **config_limits(model),
                        "lineage": lineage, "record": compile_record(manager.records, context.calibration)}
    program = target.lower(gm, context, **backend_options)
    program.pipeline, program.records = str(manager.pipeline), list(manager.records)
    # a backend's build (ort-paged) records its own step; a rank's shards have no digest of the whole
    if isinstance(program, Program):
        program.lineage = lineage
        if program.pipeline and world_size == 1:
            from bmc.models.weights import compiled_step
            program.lineage = compiled_step(lineage, program.pipeline, context.settings["record"], program.graph_module)
    return program


def lineage_of_source(model: Any, weights: Any = None) -> list[dict]:
    """The recorded steps behind the weights compiled (bmc.compile, bmc-opt): `weights`, else
    the model's own: a .pt2 archive's, a Program's, or an `hf:DIR` export's lineage.json."""
    from bmc.models import weights as weight_files
    if weights is not None:
        return weight_files.lineage_of(weights)
    if isinstance(model, str) and model.endswith(".pt2"):
        from bmc.ir.serialize import read_pt2_metadata
        return list(read_pt2_metadata(model).get("lineage", []))
    if isinstance(model, str):
        from bmc.models import hf
        directory = hf.directory_of(model)
        if directory and os.path.isfile(os.path.join(directory, weight_files.LINEAGE)):
            return weight_files.lineage_of(directory)
    if isinstance(model, Program):
        return list(model.lineage)
    return []


def compile_record(records: Sequence[PassRecord], calibration: Any = None) -> dict:
    """What a build's lineage step records of the pipeline that made it: each pass's
    statistics, and a digest of the calibration batches the passes scored on."""
    record: dict = {"statistics": {str(r.spec): dict(r.statistics) for r in records if r.statistics}}
    if calibration:
        import hashlib
        from torch.utils._pytree import tree_leaves
        digest = hashlib.sha256()
        for t in tree_leaves(list(calibration)):
            if isinstance(t, torch.Tensor):
                digest.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        record["calibration"] = {"batches": len(calibration), "sha256": digest.hexdigest()}
    return record


def config_limits(model: Any) -> dict:
    """What a Hugging Face model's config says about the positions it takes (for backends that
    cannot read it off the graph: RoPE models have no position table): the fewest of
    max_position_embeddings and a sliding window (within which a windowed mask is causal).
    `model` is the module, or a model path (`hf:DIR`: its config.json)."""
    config = getattr(model, "config", None)
    if isinstance(model, str):
        from bmc.models import hf
        directory = hf.directory_of(model)
        config = hf.read_config(directory) if directory else None
    limits = [getattr(config, key, None) for key in ("max_position_embeddings", "n_positions", "sliding_window")]
    limits = [n for n in limits if isinstance(n, int) and n > 0]
    return {"max_positions": min(limits)} if limits else {}


def resolve_world_size(world_size: int | None) -> int:
    """The world size a program is compiled for: the initialized process group's by default; a
    given one must agree with it (a plan for N ranks run by M processes trains wrongly)."""
    import torch.distributed as dist
    running = dist.get_world_size() if dist.is_available() and dist.is_initialized() else None
    if world_size is None:
        return running or 1
    if world_size < 1:
        raise BmcError(f"world_size must be >= 1, got {world_size}")
    if running is not None and world_size != running:
        raise BmcError(f"world_size={world_size} but torch.distributed runs {running} processes: "
                       f"drop world_size= (it defaults to the process group's size) or launch {world_size} ranks")
    return world_size


def load(path: str, **options):
    """Read a program written by `Program.save` or `bmc-opt -o`: a .pt2 archive, lowered with
    the torch backend for this process group (every rank keeps only its shard), or a
    directory a backend wrote (ort-paged; options: budget, prefetch, threads, ...)."""
    import os
    if os.path.isdir(path):
        return load_directory(path, **options)
    world_size = resolve_world_size(options.pop("world_size", None))
    if options:
        raise BmcError(f"options {sorted(options)} are for ort-paged directories; {path} is a .pt2 archive")
    from bmc.ir.serialize import load_pt2
    gm, meta = load_pt2(path)
    pipeline = meta.get("pipeline", "")
    lineage = list(meta.get("lineage", []))
    context = PassContext(world_size=world_size, settings={"pipeline": pipeline})
    program = get_backend("torch").lower(gm, context)
    program.pipeline, program.lineage = pipeline, lineage
    return program
